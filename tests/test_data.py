"""defenda.data and the built-in tasks: shapes, ranges, splits, on-disk formats, clear errors."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from defenda import TaskData
from defenda import data as D
from defenda.errors import DataError, ParamError

torch.set_num_threads(1)


def _rows(t: torch.Tensor) -> set[bytes]:
    """Each sample as bytes, to check splits are disjoint by content."""
    return {r.numpy().tobytes() for r in t.reshape(len(t), -1)}


def _assert_splits_ok(d: TaskData) -> None:
    sizes = [len(d.train[0]), len(d.test[0]), len(d.public[0])]
    assert all(n > 0 for n in sizes)
    for x, y in (d.train, d.test, d.public):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert tuple(x.shape[1:]) == d.input_shape and len(x) == len(y)
        assert int(y.min()) >= 0 and int(y.max()) < d.num_classes


def _assert_same(a: TaskData, b: TaskData) -> None:
    for s in ("train", "test", "public"):
        assert torch.equal(getattr(a, s)[0], getattr(b, s)[0]) and torch.equal(getattr(a, s)[1], getattr(b, s)[1])
    assert torch.equal(a.mean, b.mean) and torch.equal(a.std, b.std)


# --------------------------------------------------------------------------- embedded sets


@pytest.fixture(scope="module")
def digits() -> TaskData:
    return D.load_digits_task()


def test_digits_shapes_ranges_and_labels(digits: TaskData) -> None:
    _assert_splits_ok(digits)
    assert digits.kind == "image" and digits.input_shape == (1, 8, 8) and digits.num_classes == 10
    assert sum(len(s[0]) for s in (digits.train, digits.test, digits.public)) == 1797
    assert len(digits.test[0]) == round(0.2 * 1797) and len(digits.public[0]) == round(0.1 * 1797)
    assert digits.mean.shape == (1, 1, 1) and digits.std.shape == (1, 1, 1)
    unit = torch.cat([digits.to_unit(s[0]) for s in (digits.train, digits.test, digits.public)])
    assert unit.min() >= -1e-6 and unit.max() <= 1 + 1e-6
    assert unit.max() > 0.99  # pixel count 16 maps to 1
    # model space: train split standardised (stats are computed on it)
    assert abs(float(digits.train[0].mean())) < 1e-4 and abs(float(digits.train[0].std()) - 1) < 1e-2
    assert set(digits.train[1].tolist()) == set(range(10))  # stratified: every class in every split
    assert set(digits.public[1].tolist()) == set(range(10))
    lo, hi = digits.box  # type: ignore[misc]
    assert torch.allclose(digits.to_unit(lo), torch.zeros(1, 8, 8), atol=1e-6)


def test_digits_splits_disjoint_and_deterministic(digits: TaskData) -> None:
    a, b, c = (_rows(s[0]) for s in (digits.train, digits.test, digits.public))
    # digits has a handful of duplicate images; disjointness is of samples, so compare with the source
    from sklearn.datasets import load_digits

    n_unique = len({r.tobytes() for r in load_digits().images.astype(np.float32)})
    assert len(a | b | c) == n_unique
    _assert_same(digits, D.load_digits_task())
    other = D.load_digits_task(split_seed=1)
    assert not torch.equal(other.test[0], digits.test[0])


def test_split_indices_disjoint_cover_and_stratified() -> None:
    y = np.repeat(np.arange(5), 40)
    tr, te, pu = D.split_indices(y, test_fraction=0.25, public_fraction=0.1, seed=3)
    assert len(set(tr) | set(te) | set(pu)) == len(y) == len(tr) + len(te) + len(pu)
    assert np.bincount(y[te]).tolist() == [10] * 5 and np.bincount(y[pu]).tolist() == [4] * 5
    again = D.split_indices(y, test_fraction=0.25, public_fraction=0.1, seed=3)
    assert all(np.array_equal(p, q) for p, q in zip((tr, te, pu), again))
    _, _, empty = D.split_indices(y, test_fraction=0.25, public_fraction=0.0, seed=3)
    assert len(empty) == 0
    with pytest.raises(ValueError):
        D.split_indices(y, test_fraction=0.6, public_fraction=0.5, seed=0)


def test_max_samples_caps_before_splitting() -> None:
    d = D.load_digits_task(max_samples=100)
    assert sum(len(s[0]) for s in (d.train, d.test, d.public)) == 100
    _assert_same(d, D.load_digits_task(max_samples=100))


def test_breast_cancer_standardised_and_unit_space_is_raw() -> None:
    from sklearn.datasets import load_breast_cancer

    d = D.load_breast_cancer_task()
    _assert_splits_ok(d)
    assert d.kind == "tabular" and d.input_shape == (30,) and d.num_classes == 2 and d.box is None
    assert d.mean.shape == (30,) and d.std.shape == (30,)
    assert sum(len(s[0]) for s in (d.train, d.test, d.public)) == 569
    assert torch.allclose(d.train[0].mean(0), torch.zeros(30), atol=1e-4)
    assert torch.allclose(d.train[0].std(0, unbiased=False), torch.ones(30), atol=1e-3)
    raw = torch.from_numpy(load_breast_cancer().data.astype(np.float32))
    unit = torch.cat([d.to_unit(s[0]) for s in (d.train, d.test, d.public)])
    # every reconstructed row is one of the raw rows (float32 round-trip tolerance)
    dist = torch.cdist(unit.double(), raw.double()).min(dim=1).values
    assert float(dist.max()) < 1e-2
    assert len(_rows(d.train[0]) & _rows(d.test[0])) == 0 and len(_rows(d.train[0]) & _rows(d.public[0])) == 0
    _assert_same(d, D.load_breast_cancer_task())


# --------------------------------------------------------------------------- CIFAR-10 in its on-disk format


def _write_cifar(root: Path, n_per_batch: int = 20, n_test: int = 30) -> Path:
    """Pickled dict batches as in cifar-10-python.tar.gz.

    The official batches are Python 2 pickles: their keys read back as b"data",
    b"labels" with ``encoding="bytes"`` but as "data", "labels" with the
    ``encoding="latin1"`` torchvision uses. Python 3 can only write the latter
    form directly, which is what torchvision sees either way.
    """
    folder = root / D.CIFAR10_DIR
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", n_per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        batch = {
            "batch_label": name,
            "labels": [int(v) for v in np.arange(n) % 10],
            "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),  # rows: 1024 R, 1024 G, 1024 B
            "filenames": [f"{name}_{i}.png" for i in range(n)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {"label_names": "airplane automobile bird cat deer dog frog horse ship truck".split(),
            "num_cases_per_batch": n_per_batch, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder


def test_cifar10_reads_the_pickle_batches(tmp_path: Path) -> None:
    folder = _write_cifar(tmp_path)
    d = D.load_cifar10_task(tmp_path, public_fraction=0.1)
    _assert_splits_ok(d)
    assert d.input_shape == (3, 32, 32) and d.num_classes == 10 and d.mean.shape == (3, 1, 1)
    assert len(d.test[0]) == 30 and len(d.train[0]) + len(d.public[0]) == 100 and len(d.public[0]) == 10
    # the first test image round-trips to the raw bytes (CHW layout of the row)
    raw = pickle.loads((folder / "test_batch").read_bytes())["data"][0].reshape(3, 32, 32)
    got = (d.to_unit(d.test[0][0]) * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(got, raw)
    _assert_same(d, D.load_cifar10_task(tmp_path, public_fraction=0.1))
    capped = D.load_cifar10_task(tmp_path, max_samples=40)
    assert len(capped.train[0]) + len(capped.public[0]) == 40 and len(capped.test[0]) == 30


def test_cifar10_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cifar-10-batches-py") as info:
        D.load_cifar10_task(tmp_path / "nowhere")
    assert "\n" not in str(info.value) and "extract" in str(info.value)
    folder = _write_cifar(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="missing data_batch_3"):
        D.load_cifar10_task(tmp_path)
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="malformed"):
        D.load_cifar10_task(tmp_path)


# --------------------------------------------------------------------------- MNIST idx files


def _idx(array: np.ndarray) -> bytes:
    """The idx-ubyte encoding: magic (0, 0, 0x08 = ubyte, ndim), big-endian int32 dims, raw bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_mnist(root: Path, n_train: int = 50, n_test: int = 20, gz: bool = False) -> Path:
    folder = root / D.MNIST_DIR
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(n_test) % 10,
    }
    for name, arr in arrays.items():
        blob = _idx(arr)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(blob))
        else:
            (folder / name).write_bytes(blob)
    return folder


def test_mnist_reads_idx_files(tmp_path: Path) -> None:
    folder = _write_mnist(tmp_path)
    d = D.load_mnist_task(tmp_path, public_fraction=0.2)
    _assert_splits_ok(d)
    assert d.input_shape == (1, 28, 28) and d.num_classes == 10 and d.mean.shape == (1, 1, 1)
    assert len(d.test[0]) == 20 and len(d.public[0]) == 10 and len(d.train[0]) == 40
    raw = np.frombuffer((folder / "t10k-images-idx3-ubyte").read_bytes()[16:], dtype=np.uint8).reshape(-1, 28, 28)
    got = (d.to_unit(d.test[0][0]) * 255).round().to(torch.uint8).numpy()[0]
    assert np.array_equal(got, raw[0])
    assert d.test[1].tolist() == [i % 10 for i in range(20)]


def test_mnist_missing_or_compressed_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"MNIST.raw") as info:
        D.load_mnist_task(tmp_path)
    assert "train-images-idx3-ubyte" in str(info.value) and "\n" not in str(info.value)
    _write_mnist(tmp_path, gz=True)
    with pytest.raises(DataError, match="gunzip"):
        D.load_mnist_task(tmp_path)


# --------------------------------------------------------------------------- ImageFolder


def _write_folder(root: Path, classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 10) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_imagefolder_resizes_and_splits(tmp_path: Path) -> None:
    _write_folder(tmp_path)
    d = D.load_imagefolder_task(tmp_path, image_size=16, test_fraction=0.2, public_fraction=0.2)
    _assert_splits_ok(d)
    assert d.input_shape == (3, 16, 16) and d.num_classes == 2
    assert (len(d.train[0]), len(d.test[0]), len(d.public[0])) == (12, 4, 4)
    unit = d.to_unit(d.train[0])
    assert unit.min() >= -1e-5 and unit.max() <= 1 + 1e-5
    _assert_same(d, D.load_imagefolder_task(tmp_path, image_size=16, test_fraction=0.2, public_fraction=0.2))
    capped = D.load_imagefolder_task(tmp_path, image_size=8, max_samples=10)
    assert sum(len(s[0]) for s in (capped.train, capped.test, capped.public)) == 10


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        D.load_imagefolder_task(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no usable images"):
        D.load_imagefolder_task(tmp_path / "empty")


# --------------------------------------------------------------------------- the task plugins


def test_registered_tasks_and_params() -> None:
    import defenda_tasks
    from defenda.models import ACTIVATIONS
    from defenda.params import validate_params_class
    from defenda_tasks._common import ACTIVATIONS as DECLARED

    registered: list[type] = []
    defenda_tasks.defenda_register_tasks(registered.append)
    names = [cls.name for cls in registered]
    assert names == ["digits", "breast-cancer", "photos", "faces", "cifar10", "mnist", "imagefolder"]
    for cls in registered:
        assert validate_params_class(cls.Params) == [], cls.name
        assert cls.summary()
    assert set(DECLARED) == set(ACTIVATIONS)
    by_name = {cls.name: cls for cls in registered}
    assert by_name["digits"]().params.model == "cnn"
    assert by_name["breast-cancer"]().params.model == "mlp" and by_name["breast-cancer"]().params.widths == (200,)
    with pytest.raises(ParamError, match="test_fraction"):
        by_name["digits"](test_fraction=0.9, public_fraction=0.2)
    with pytest.raises(ParamError, match="must be one of"):
        by_name["breast-cancer"](model="cnn")


def test_task_params_share_one_base_and_keep_their_defaults() -> None:
    """Trial keys hash the task parameters: their names and defaults must not move."""
    import dataclasses

    import defenda_tasks
    from defenda_tasks._common import TaskParams

    model = {"model": "cnn", "widths": (200,), "act": "relu", "norm": "group"}
    split = {"public_fraction": 0.1, "split_seed": 0, "max_samples": None}
    expected = {
        "digits": {**model, "test_fraction": 0.2, **split},
        "breast-cancer": {"model": "mlp", "widths": (200,), "act": "relu", "test_fraction": 0.2, **split},
        "cifar10": {"root": "data", **model, **split},
        "mnist": {"root": "data", **model, **split},
        "imagefolder": {"root": "data/images", "image_size": 32, **model, "test_fraction": 0.2, **split},
    }
    conv = {**model, "model": "convnet", "width": None, "head": ()}
    expected["photos"] = {**conv, "test_fraction": 0.2, **split, "scale": 256, "crop": 32,
                          "photographs": D.PHOTOGRAPH_NAMES}
    expected["faces"] = {**conv, "test_fraction": 0.2, **split, "image_size": 25}
    registered: list[type] = []
    defenda_tasks.defenda_register_tasks(registered.append)
    for cls in registered:
        assert issubclass(cls.Params, TaskParams), cls.name
        assert dataclasses.asdict(cls.Params()) == expected[cls.name], cls.name
    with pytest.raises(ParamError, match="public_fraction"):
        registered[4](public_fraction=1.0)  # cifar10: no test_fraction, the split is still checked
    with pytest.raises(ParamError, match="image_size"):
        registered[6](image_size=0)


def test_task_load_caches_and_builds_models(tmp_path: Path) -> None:
    from defenda_tasks.embedded import BreastCancerTask, DigitsTask
    from defenda_tasks.torchvision_sets import Cifar10Task, ImageFolderTask, MnistTask

    task = DigitsTask(max_samples=200)
    d = task.load()
    assert task.load() is d
    assert task.build_model(d)(d.train[0][:3]).shape == (3, 10)
    mlp = DigitsTask(model="mlp", widths=[32, 16], act="tanh")
    assert mlp.build_model(mlp.load())(d.train[0][:2]).shape == (2, 10)
    bc = BreastCancerTask()
    assert bc.build_model(bc.load())(bc.load().train[0][:4]).shape == (4, 2)
    _write_cifar(tmp_path / "c")
    _write_mnist(tmp_path / "m")
    _write_folder(tmp_path / "f")
    for t in (Cifar10Task(root=str(tmp_path / "c")), MnistTask(root=str(tmp_path / "m")),
              ImageFolderTask(root=str(tmp_path / "f"), image_size=8)):
        data = t.load()
        assert t.build_model(data)(data.test[0][:2]).shape == (2, data.num_classes)
    with pytest.raises(DataError):
        Cifar10Task(root=str(tmp_path / "nowhere")).load()


def test_task_pickles_without_its_cached_data() -> None:
    from defenda_tasks.embedded import DigitsTask

    task = DigitsTask(max_samples=100)
    task.load()
    clone = pickle.loads(pickle.dumps(task))
    assert "_data" not in clone.__dict__ and clone.params == task.params
    _assert_same(clone.load(), task.load())
