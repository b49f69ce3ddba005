"""The photos and faces tasks: real photographs bundled with installed packages, disjoint regions, clear errors."""

from __future__ import annotations

import collections
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from defenda import data as D
from defenda.errors import DataError, ParamError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def crops() -> tuple[torch.Tensor, torch.Tensor, list[D.Crop]]:
    return D.photo_crops()


def _overlap(a: D.Crop, b: D.Crop) -> bool:
    return (a.photo == b.photo and a.top < b.top + b.size and b.top < a.top + a.size
            and a.left < b.left + b.size and b.left < a.left + a.size)


def test_every_bundled_photograph_is_installed_with_a_licence() -> None:
    for photo in D.PHOTOGRAPHS:
        assert photo.path().is_file(), photo
        assert photo.licence and photo.credit
        image = photo.read()
        assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8 and min(image.shape[:2]) >= 256
        assert image.std() > 10  # a real photograph, not a blank stand-in
    assert len(set(D.PHOTOGRAPH_NAMES)) == len(D.PHOTOGRAPHS) == 10


def test_crops_are_real_disjoint_tiles_one_class_per_photograph(crops) -> None:
    x, y, where = crops
    assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32 and 0 <= float(x.min()) < float(x.max()) <= 1
    assert [D.PHOTOGRAPH_NAMES[int(label)] for label in y] == [c.photo for c in where]
    # no two crops overlap anywhere, so no partition of the crops (splits, clients) shares a pixel
    by_photo = collections.defaultdict(list)
    for c in where:
        by_photo[c.photo].append(c)
    for tiles in by_photo.values():
        assert not any(_overlap(a, b) for a, b in itertools.combinations(tiles, 2))
    counts = collections.Counter((c.photo, c.split) for c in where)
    for name in D.PHOTOGRAPH_NAMES:  # every class in every split
        assert all(counts[(name, s)] > 0 for s in ("train", "test", "public")), name
    # the crops differ (no duplicated tile) and the classes are photographs, not noise
    flat = x.reshape(len(x), -1)
    assert len({r.numpy().tobytes() for r in flat}) == len(x)


def test_public_split_is_a_contiguous_region_apart_from_the_private_one(crops) -> None:
    _, _, where = crops
    for name in D.PHOTOGRAPH_NAMES:
        public = [c for c in where if c.photo == name and c.split == "public"]
        private = [c for c in where if c.photo == name and c.split != "public"]
        assert not any(_overlap(a, b) for a in public for b in private)
        # taken column by column: the public tiles fill at most two (partial) columns of the grid per wrap
        assert len({c.left for c in public}) <= 3


def test_photos_task_normalises_with_train_statistics_and_is_deterministic() -> None:
    d = D.load_photos_task()
    assert d.name == "photos" and d.kind == "image" and d.input_shape == (3, 32, 32) and d.num_classes == 10
    assert len(d.train[0]) > 400 and len(d.test[0]) > 100 and len(d.public[0]) > 50
    assert torch.allclose(d.train[0].mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(d.train[0].std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-3)
    unit = d.to_unit(d.train[0])
    assert float(unit.min()) >= -1e-5 and float(unit.max()) <= 1 + 1e-5
    again = D.load_photos_task()
    assert torch.equal(d.train[0], again.train[0]) and torch.equal(d.public[1], again.public[1])
    other = D.load_photos_task(split_seed=1)
    assert not torch.equal(d.public[0], other.public[0])
    capped = D.load_photos_task(max_samples=100)
    assert sum(len(s[0]) for s in (capped.train, capped.test, capped.public)) == 100


def test_a_missing_photograph_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(D.Photograph, "path", lambda self: tmp_path / self.file)
    with pytest.raises(DataError, match=r"photograph 'astronaut' is missing from the installed scikit-image") as info:
        D.load_photos_task()
    assert "\n" not in str(info.value) and "reinstall" in str(info.value)
    with pytest.raises(DataError, match="at least two distinct names"):
        D.photo_crops(["astronaut", "mona_lisa"])
    with pytest.raises(DataError, match="at least two distinct names"):
        D.photo_crops(["astronaut"])


def test_faces_task_is_lfw_faces_against_non_faces() -> None:
    d = D.load_faces_task()
    assert d.input_shape == (1, 25, 25) and d.num_classes == 2
    n = sum(len(s[0]) for s in (d.train, d.test, d.public))
    assert n == 200
    labels = torch.cat([d.train[1], d.test[1], d.public[1]])
    assert int(labels.sum()) == 100
    assert abs(float(d.train[1].float().mean()) - 0.5) < 0.05  # stratified
    big = D.load_faces_task(image_size=32)
    assert big.input_shape == (1, 32, 32)
    unit = big.to_unit(big.train[0])
    assert float(unit.min()) >= -1e-5 and float(unit.max()) <= 1 + 1e-5


def test_photos_and_faces_task_plugins_build_their_victims() -> None:
    from defenda_tasks.photographs import FacesTask, PhotosTask

    task = PhotosTask(width=4, head=(8,), photographs=("astronaut", "chelsea", "coffee"))
    data = task.load()
    assert data.num_classes == 3
    model = task.build_model(data)
    assert model(data.train[0][:2]).shape == (2, 3)
    assert [m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)] == [8, 3]
    faces = FacesTask(model="lenet")
    fdata = faces.load()
    assert faces.build_model(fdata)(fdata.train[0][:2]).shape == (2, 2)
    with pytest.raises(ParamError, match="at least two distinct"):
        PhotosTask(photographs=("astronaut",))
    with pytest.raises(ParamError, match="unknown photographs"):
        PhotosTask(photographs=("astronaut", "mona_lisa"))
    with pytest.raises(ParamError, match="width"):
        PhotosTask(width=0)
    with pytest.raises(ParamError, match="crop"):
        PhotosTask(crop=512, scale=256)
