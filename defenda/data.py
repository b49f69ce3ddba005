"""Data sets as :class:`~defenda.interfaces.TaskData`: loaded, split and put in model space.

Embedded sets (no files, no download) come from scikit-learn:

* :func:`load_digits_task` — 1797 real 8×8 handwritten digits, ``(1, 8, 8)``;
* :func:`load_breast_cancer_task` — 569 × 30 tabular features, 2 classes.

File-backed sets are read from a local directory with torchvision's loaders
(never downloaded; a missing file is a one-line :class:`~defenda.errors.DataError`
saying where it was expected and what to do):

* :func:`load_cifar10_task` — ``ROOT/cifar-10-batches-py/`` (the python pickle batches);
* :func:`load_mnist_task` — ``ROOT/MNIST/raw/`` (the four uncompressed idx files);
* :func:`load_imagefolder_task` — ``ROOT/<class>/<image>``, resized to a square.

Splits. Every set is split into ``train`` (the clients' data), ``test``
(utility) and ``public`` (the attacker's sample of the same distribution),
disjoint, stratified by class where the class counts allow it, and
deterministic for a given ``split_seed``. Fractions are of the whole source;
sets that ship an official test split (CIFAR-10, MNIST) use it as ``test`` and
carve ``public`` out of the official training split.

Model space. Images are scaled to [0, 1] (unit space) and normalised per
channel with the mean and standard deviation of the *train* split, so nothing
about the test or public data leaks into the transform. Tabular features are
standardised per feature the same way; their unit space is the raw feature
values.

``max_samples`` caps how many samples are read from each source split (drawn
at random with ``split_seed``, before splitting) — for quick runs.
"""

from __future__ import annotations

import functools
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from defenda.errors import DataError
from defenda.records import TaskData, TaskKind

Pair = tuple[torch.Tensor, torch.Tensor]

CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")
MNIST_DIR = os.path.join("MNIST", "raw")
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

#: A standard deviation below this is treated as 1, so a constant channel or
#: feature does not blow up to inf/NaN in model space.
_MIN_STD = 1e-6


# --------------------------------------------------------------------------- splits


def subsample(n: int, max_samples: int | None, seed: int) -> np.ndarray:
    """Sorted indices of at most ``max_samples`` of ``n`` items, drawn with ``seed`` (all when None)."""
    if max_samples is None or max_samples >= n:
        return np.arange(n)
    if max_samples < 1:
        raise ValueError(f"max_samples must be at least 1, got {max_samples}")
    return np.sort(np.random.default_rng(seed).choice(n, size=max_samples, replace=False))


def _carve(idx: np.ndarray, y: np.ndarray, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``idx`` into (rest, ``count`` carved out), stratified by ``y`` when possible."""
    if count <= 0:
        return idx, idx[:0]
    if count >= len(idx):
        raise ValueError(f"cannot carve {count} of {len(idx)} samples and keep any for training")
    from sklearn.model_selection import train_test_split

    labels = y[idx]
    try:
        rest, carved = train_test_split(idx, test_size=count, random_state=seed, stratify=labels)
    except ValueError:  # a class too small to stratify (tiny or capped sets): plain random split
        rest, carved = train_test_split(idx, test_size=count, random_state=seed)
    return np.sort(rest), np.sort(carved)


def split_indices(
    y: np.ndarray, *, test_fraction: float, public_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Disjoint sorted ``(train, test, public)`` indices into ``y``; fractions are of ``len(y)``."""
    _check_fractions(test_fraction, public_fraction)
    n = len(y)
    everything = np.arange(n)
    rest, test = _carve(everything, y, round(test_fraction * n), seed)
    train, public = _carve(rest, y, round(public_fraction * n), seed + 1)
    return train, test, public


def _check_fractions(test_fraction: float, public_fraction: float) -> None:
    if not (0 <= test_fraction < 1 and 0 <= public_fraction < 1 and test_fraction + public_fraction < 1):
        raise ValueError(
            f"split fractions must be in [0, 1) and sum below 1, got test={test_fraction}, public={public_fraction}"
        )


def _take(x: torch.Tensor, y: torch.Tensor, idx: np.ndarray) -> Pair:
    index = torch.from_numpy(idx).long()
    return x[index], y[index]


# --------------------------------------------------------------------------- transforms


def _safe_std(std: torch.Tensor) -> torch.Tensor:
    return torch.where(std < _MIN_STD, torch.ones_like(std), std)


def image_task_data(name: str, num_classes: int, train: Pair, test: Pair, public: Pair) -> TaskData:
    """TaskData from unit-space images ``(N, C, H, W)`` in [0, 1], normalised with train-split channel stats."""
    x = train[0]
    mean = x.mean(dim=(0, 2, 3)).view(-1, 1, 1)
    std = _safe_std(x.std(dim=(0, 2, 3), unbiased=False)).view(-1, 1, 1)
    return _task_data(name, "image", num_classes, train, test, public, mean, std)


def tabular_task_data(name: str, num_classes: int, train: Pair, test: Pair, public: Pair) -> TaskData:
    """TaskData from raw features ``(N, F)``, standardised with train-split feature stats."""
    x = train[0]
    mean = x.mean(dim=0)
    std = _safe_std(x.std(dim=0, unbiased=False))
    return _task_data(name, "tabular", num_classes, train, test, public, mean, std)


def _task_data(
    name: str, kind: TaskKind, num_classes: int, train: Pair, test: Pair, public: Pair, mean: torch.Tensor,
    std: torch.Tensor,
) -> TaskData:
    def model_space(pair: Pair) -> Pair:
        return ((pair[0] - mean) / std).float().contiguous(), pair[1].long()

    return TaskData(
        name=name,
        kind=kind,
        input_shape=tuple(train[0].shape[1:]),
        num_classes=num_classes,
        train=model_space(train),
        test=model_space(test),
        public=model_space(public),
        mean=mean.float(),
        std=std.float(),
    )


def _split_and_build(
    name: str, kind: TaskKind, x: torch.Tensor, y: torch.Tensor, num_classes: int, *, test_fraction: float,
    public_fraction: float, split_seed: int, max_samples: int | None,
) -> TaskData:
    """Subsample, split three ways and normalise one pool of samples (no official test split)."""
    keep = subsample(len(y), max_samples, split_seed)
    x, y = _take(x, y, keep)
    tr, te, pu = split_indices(y.numpy(), test_fraction=test_fraction, public_fraction=public_fraction,
                               seed=split_seed)
    build = image_task_data if kind == "image" else tabular_task_data
    return build(name, num_classes, _take(x, y, tr), _take(x, y, te), _take(x, y, pu))


def _official_split_task(
    name: str, num_classes: int, train: Pair, test: Pair, *, public_fraction: float, split_seed: int,
    max_samples: int | None,
) -> TaskData:
    """Image set with an official test split: cap both, carve ``public`` out of the official train split."""
    _check_fractions(0.0, public_fraction)
    train = _take(*train, subsample(len(train[1]), max_samples, split_seed))
    test = _take(*test, subsample(len(test[1]), max_samples, split_seed))
    y = train[1].numpy()
    tr, pu = _carve(np.arange(len(y)), y, round(public_fraction * len(y)), split_seed)
    return image_task_data(name, num_classes, _take(*train, tr), test, _take(*train, pu))


# --------------------------------------------------------------------------- embedded sets


def load_digits_task(
    *, test_fraction: float = 0.2, public_fraction: float = 0.1, split_seed: int = 0, max_samples: int | None = None
) -> TaskData:
    """scikit-learn's handwritten digits: 1797 grayscale 8×8 images, 10 classes.

    Pixel counts 0…16 are scaled to [0, 1]; inputs have shape ``(1, 8, 8)``.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    return _split_and_build("digits", "image", x, y, 10, test_fraction=test_fraction,
                            public_fraction=public_fraction, split_seed=split_seed, max_samples=max_samples)


def load_breast_cancer_task(
    *, test_fraction: float = 0.2, public_fraction: float = 0.1, split_seed: int = 0, max_samples: int | None = None
) -> TaskData:
    """scikit-learn's Wisconsin breast-cancer set: 569 samples × 30 continuous features, 2 classes."""
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    x = torch.from_numpy(np.asarray(bunch.data, dtype=np.float32))
    y = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    return _split_and_build("breast-cancer", "tabular", x, y, 2, test_fraction=test_fraction,
                            public_fraction=public_fraction, split_seed=split_seed, max_samples=max_samples)


# --------------------------------------------------------------------------- file-backed sets


def _require_files(what: str, folder: Path, files: Sequence[str], how: str) -> None:
    """Raise a one-line DataError when ``folder`` or any of ``files`` in it is missing."""
    missing = [f for f in files if not (folder / f).is_file()]
    if not folder.is_dir() or missing:
        detail = "directory not found" if not folder.is_dir() else "missing " + ", ".join(missing)
        raise DataError(f"{what} not found: expected {folder}/ with {', '.join(files)} ({detail}); {how}")


def load_cifar10_task(
    root: str | os.PathLike[str], *, public_fraction: float = 0.1, split_seed: int = 0, max_samples: int | None = None
) -> TaskData:
    """CIFAR-10 from ``ROOT/cifar-10-batches-py/`` (32×32 RGB, 10 classes), via torchvision's loader.

    ``test`` is the official test batch; ``public`` is carved out of the five training batches.
    """
    folder = Path(root).expanduser() / CIFAR10_DIR
    _require_files("CIFAR-10", folder, CIFAR10_FILES,
                   "download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and "
                   f"extract it into {Path(root).expanduser()} (defenda never downloads)")
    cls = _cifar10_class()
    try:
        parts = [cls(str(Path(root).expanduser()), train=flag, download=False) for flag in (True, False)]
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise DataError(f"CIFAR-10 files in {folder} are malformed ({type(exc).__name__}: {exc}); "
                        "re-extract cifar-10-python.tar.gz") from None
    train, test = (_cifar_tensors(p) for p in parts)
    return _official_split_task("cifar10", 10, train, test, public_fraction=public_fraction, split_seed=split_seed,
                                max_samples=max_samples)


def _cifar10_class() -> type:
    """torchvision's CIFAR10 with the md5 checks replaced by existence checks.

    Why: the checksums only match the full official batches, which rules out
    trimmed copies (and tests); the pickles are validated by parsing instead.
    """
    base = _torchvision().datasets.CIFAR10

    class LocalCIFAR10(base):  # type: ignore[misc, valid-type]
        train_list = [[name, None] for name, _ in base.train_list]
        test_list = [[name, None] for name, _ in base.test_list]
        meta = {**base.meta, "md5": None}

    return LocalCIFAR10


def _cifar_tensors(ds: Any) -> Pair:
    """Unit-space ``(N, 3, 32, 32)`` images and labels from a torchvision CIFAR10 (no per-item PIL)."""
    x = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).float().div(255.0)
    return x, torch.as_tensor(ds.targets, dtype=torch.long)


def load_mnist_task(
    root: str | os.PathLike[str], *, public_fraction: float = 0.1, split_seed: int = 0, max_samples: int | None = None
) -> TaskData:
    """MNIST from the uncompressed idx files in ``ROOT/MNIST/raw/`` (28×28 grayscale, 10 classes).

    ``test`` is the official t10k set; ``public`` is carved out of the official training set.
    """
    base = Path(root).expanduser()
    folder = base / MNIST_DIR
    gz = [f for f in MNIST_FILES if not (folder / f).is_file() and (folder / f"{f}.gz").is_file()]
    how = (f"decompress them with 'gunzip {folder}/*.gz'" if gz else
           "download the four *-ubyte.gz files from an MNIST mirror, put them in that directory and "
           "gunzip them (defenda never downloads)")
    _require_files("MNIST", folder, MNIST_FILES, how)
    datasets = _torchvision().datasets
    try:
        parts = [datasets.MNIST(str(base), train=flag, download=False) for flag in (True, False)]
    except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as exc:
        raise DataError(f"MNIST files in {folder} are malformed ({type(exc).__name__}: {exc}); "
                        "re-download and gunzip them") from None
    train, test = ((p.data.unsqueeze(1).float().div(255.0), p.targets.long()) for p in parts)
    return _official_split_task("mnist", 10, train, test, public_fraction=public_fraction, split_seed=split_seed,
                                max_samples=max_samples)


def load_imagefolder_task(
    root: str | os.PathLike[str], *, image_size: int = 32, test_fraction: float = 0.2, public_fraction: float = 0.1,
    split_seed: int = 0, max_samples: int | None = None, name: str = "imagefolder",
) -> TaskData:
    """Images in ``ROOT/<class>/<file>`` (torchvision ImageFolder), RGB, resized to ``image_size``² (aspect not kept).

    Classes are the sub-directory names in sorted order. Only the ``max_samples``
    selected images are decoded.
    """
    folder = Path(root).expanduser()
    how = "put one sub-directory per class with its images (.png, .jpg, …) there"
    if not folder.is_dir():
        raise DataError(f"image folder not found: expected {folder}/<class>/<image files> (directory not found); {how}")
    tv = _torchvision()
    transform = tv.transforms.Compose([tv.transforms.Resize((image_size, image_size)), tv.transforms.ToTensor()])
    try:
        ds = tv.datasets.ImageFolder(str(folder), transform=transform)
    except (FileNotFoundError, RuntimeError) as exc:  # no class folders / no images in them
        raise DataError(f"image folder {folder} has no usable images ({exc}); {how}") from None
    keep = subsample(len(ds), max_samples, split_seed)
    images, labels = [], []
    for i in keep:
        try:
            image, label = ds[int(i)]
        except OSError as exc:  # PIL cannot decode the file
            raise DataError(f"cannot read image {ds.samples[int(i)][0]}: {exc}; remove or replace it") from None
        images.append(image)
        labels.append(label)
    x, y = torch.stack(images), torch.as_tensor(labels, dtype=torch.long)
    return _split_and_build(name, "image", x, y, len(ds.classes), test_fraction=test_fraction,
                            public_fraction=public_fraction, split_seed=split_seed, max_samples=None)


def _torchvision() -> Any:
    """torchvision, imported through the compatibility shim (lazy: it is slow to import)."""
    from defenda._torchvision_compat import import_torchvision

    return import_torchvision()


# --------------------------------------------------------------------------- bundled photographs


@dataclass(frozen=True)
class Photograph:
    """A photograph shipped inside an installed package (no download), with its licence."""

    name: str
    package: str  # the distribution that ships it
    file: str  # path inside the package's data folder
    licence: str
    credit: str

    def path(self) -> Path:
        """Where the installed package keeps the file."""
        if self.package == "scikit-image":
            import skimage.data

            return Path(skimage.data.__file__).parent / self.file
        if self.package == "scikit-learn":
            import sklearn.datasets

            return Path(sklearn.datasets.__file__).parent / "images" / self.file
        import matplotlib

        return Path(matplotlib.get_data_path()) / "sample_data" / self.file

    def read(self) -> np.ndarray:
        """The photograph as ``(H, W, 3)`` uint8 RGB; a one-line DataError if the file is missing."""
        path = self.check()
        from PIL import Image

        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))

    def check(self) -> Path:
        """The file's path; a one-line DataError saying what to do when the installed package lacks it."""
        path = self.path()
        if not path.is_file():
            from importlib.metadata import PackageNotFoundError, version

            try:
                installed = f"{self.package} {version(self.package)}"
            except PackageNotFoundError:
                installed = self.package
            raise DataError(
                f"photograph {self.name!r} is missing from the installed {installed} (expected {path}); "
                f"reinstall it with 'pip install --force-reinstall {self.package}' or leave it out of photographs")
        return path


#: The photographs of the ``photos`` task, one class each (licences from each package's own docs:
#: scikit-image's ``skimage.data`` docstrings, scikit-learn's ``datasets/images/README.txt``).
PHOTOGRAPHS: tuple[Photograph, ...] = (
    Photograph("astronaut", "scikit-image", "astronaut.png", "public domain",
               "NASA (Eileen Collins), via skimage.data.astronaut"),
    Photograph("chelsea", "scikit-image", "chelsea.png", "CC0", "Stefan van der Walt, via skimage.data.chelsea"),
    Photograph("coffee", "scikit-image", "coffee.png", "CC0",
               "Rachel Michetti, courtesy of Pikolo Espresso Bar, via skimage.data.coffee"),
    Photograph("rocket", "scikit-image", "rocket.jpg", "public domain", "SpaceX (DSCOVR launch), via skimage.data.rocket"),
    Photograph("hubble", "scikit-image", "hubble_deep_field.jpg", "public domain",
               "NASA Hubble eXtreme Deep Field, via skimage.data.hubble_deep_field"),
    Photograph("ihc", "scikit-image", "ihc.png", "no known copyright restrictions",
               "Center for Microscopy And Molecular Imaging, via skimage.data.immunohistochemistry"),
    Photograph("retina", "scikit-image", "retina.jpg", "CC0", "Mikael Häggström, via skimage.data.retina"),
    Photograph("china", "scikit-learn", "china.jpg", "CC BY 2.0",
               "danielbuechele (Flickr), via sklearn.datasets.load_sample_images"),
    Photograph("flower", "scikit-learn", "flower.jpg", "CC BY 2.0",
               "vultilion (Flickr), via sklearn.datasets.load_sample_images"),
    Photograph("grace_hopper", "matplotlib", "grace_hopper.jpg", "public domain (U.S. Navy photograph)",
               "U.S. Navy, via matplotlib's sample data"),
)
PHOTOGRAPH_NAMES = tuple(p.name for p in PHOTOGRAPHS)


@dataclass(frozen=True)
class Crop:
    """Where a crop of the ``photos`` task comes from: photograph, split and its box in resized pixels."""

    photo: str
    split: str  # 'train', 'test' or 'public'
    top: int
    left: int
    size: int


def photo_crops(
    photographs: Sequence[str] = PHOTOGRAPH_NAMES, *, scale: int = 256, crop: int = 32, test_fraction: float = 0.2,
    public_fraction: float = 0.1, split_seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, list[Crop]]:
    """Non-overlapping ``crop``×``crop`` RGB tiles of the bundled photographs, one class per photograph.

    Each photograph is resized (Lanczos) so that its short side is ``scale`` pixels and cut
    into a grid of disjoint tiles, taken column by column. Per photograph, a contiguous run of
    that order (starting at a column chosen by ``split_seed``) of ``public_fraction`` of its
    tiles is the attacker's public split, the next run of ``test_fraction`` the test split and
    the rest the clients' data — so no two crops overlap, within a split or across splits,
    and the public crops come from another part of each photograph than the private ones.

    :returns: unit-space images ``(N, 3, crop, crop)`` in [0, 1], labels ``(N,)`` (the
        photograph's index in ``photographs``) and each crop's :class:`Crop`.
    """
    _check_fractions(test_fraction, public_fraction)
    known = {p.name: p for p in PHOTOGRAPHS}
    unknown = [n for n in photographs if n not in known]
    if unknown or len(set(photographs)) != len(photographs) or len(photographs) < 2:
        raise DataError(f"photographs must be at least two distinct names of {list(PHOTOGRAPH_NAMES)}, "
                        f"got {list(photographs)}")
    if crop < 4 or scale < crop:
        raise DataError(f"need 4 <= crop <= scale, got crop={crop}, scale={scale}")
    tiles, labels, where = [], [], []
    for label, name in enumerate(photographs):
        known[name].check()  # every time: the resized pixels are cached, the file may have gone
        pixels = _resized_photograph(known[name], scale)
        height, width = pixels.shape[:2]
        rows, cols = height // crop, width // crop
        top0, left0 = (height - rows * crop) // 2, (width - cols * crop) // 2  # centre the grid
        grid = [(top0 + r * crop, left0 + c * crop) for c in range(cols) for r in range(rows)]
        n = len(grid)
        start = int(np.random.default_rng([split_seed, label]).integers(cols)) * rows
        order = [grid[(start + i) % n] for i in range(n)]
        n_public, n_test = round(public_fraction * n), round(test_fraction * n)
        for i, (top, left) in enumerate(order):
            split = "public" if i < n_public else "test" if i < n_public + n_test else "train"
            tiles.append(pixels[top:top + crop, left:left + crop])
            labels.append(label)
            where.append(Crop(name, split, top, left, crop))
    x = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).contiguous()
    return x, torch.as_tensor(labels, dtype=torch.long), where


@functools.lru_cache(maxsize=32)
def _resized_photograph(photo: Photograph, scale: int) -> np.ndarray:
    """``photo`` resized (Lanczos) to a short side of ``scale`` pixels, float32 in [0, 1] (cached: decoding
    and resizing the large photographs takes seconds)."""
    from PIL import Image

    image = Image.fromarray(photo.read())
    factor = scale / min(image.size)
    size = (round(image.size[0] * factor), round(image.size[1] * factor))
    pixels = np.asarray(image.resize(size, Image.Resampling.LANCZOS), dtype=np.float32) / 255.0
    pixels.setflags(write=False)
    return pixels


def load_photos_task(
    photographs: Sequence[str] = PHOTOGRAPH_NAMES, *, scale: int = 256, crop: int = 32, test_fraction: float = 0.2,
    public_fraction: float = 0.1, split_seed: int = 0, max_samples: int | None = None,
) -> TaskData:
    """32×32 RGB crops of ten photographs bundled with scikit-image, scikit-learn and matplotlib.

    One class per photograph; spatially disjoint train / test / public crops (see
    :func:`photo_crops`); channels normalised with the train split's statistics.
    ``max_samples`` keeps at most that many crops (drawn with ``split_seed`` from all splits).
    """
    x, y, where = photo_crops(photographs, scale=scale, crop=crop, test_fraction=test_fraction,
                              public_fraction=public_fraction, split_seed=split_seed)
    keep = subsample(len(y), max_samples, split_seed)
    split = np.array([c.split for c in where])[keep]
    x, y = _take(x, y, keep)
    parts = [_take(x, y, np.flatnonzero(split == s)) for s in ("train", "test", "public")]
    return image_task_data("photos", len(photographs), *parts)


def load_faces_task(
    *, image_size: int = 25, test_fraction: float = 0.2, public_fraction: float = 0.1, split_seed: int = 0,
    max_samples: int | None = None,
) -> TaskData:
    """Labeled Faces in the Wild as bundled with scikit-image (``lfw_subset``): 200 real 25×25 grayscale
    crops, 100 faces (class 1) and 100 non-faces from the same photographs' backgrounds (class 0).

    ``image_size`` other than 25 resizes bilinearly (antialiased when shrinking).
    """
    import skimage.data

    path = Path(skimage.data.__file__).parent / "lfw_subset.npy"
    if not path.is_file():
        raise DataError(f"lfw_subset.npy is missing from the installed scikit-image (expected {path}); "
                        "reinstall it with 'pip install --force-reinstall scikit-image'")
    if image_size < 4:
        raise DataError(f"image_size must be at least 4, got {image_size}")
    images = np.load(path).astype(np.float32)
    x = torch.from_numpy(np.clip(images, 0.0, 1.0)).unsqueeze(1)
    if image_size != x.shape[-1]:
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False,
                                            antialias=image_size < x.shape[-1]).clamp(0.0, 1.0)
    y = torch.cat([torch.ones(100, dtype=torch.long), torch.zeros(len(images) - 100, dtype=torch.long)])
    return _split_and_build("faces", "image", x, y, 2, test_fraction=test_fraction, public_fraction=public_fraction,
                            split_seed=split_seed, max_samples=max_samples)
