"""Tasks on image sets read from a local directory with torchvision's loaders (never downloaded)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from defenda import param
from defenda_tasks._common import (
    CachedTask,
    act_param,
    check_split,
    max_samples_param,
    model_param,
    norm_param,
    public_fraction_param,
    split_seed_param,
    test_fraction_param,
    widths_param,
)

if TYPE_CHECKING:
    from defenda.interfaces import TaskData


class Cifar10Task(CachedTask):
    """CIFAR-10 from ROOT/cifar-10-batches-py (32×32 RGB, 10 classes); official test split."""

    name = "cifar10"

    @dataclass(frozen=True)
    class Params:
        root: str = param("data", "directory containing cifar-10-batches-py/ (the extracted python version)")
        model: str = model_param("cnn")
        widths: tuple[int, ...] = widths_param()
        act: str = act_param()
        norm: str = norm_param()
        public_fraction: float = public_fraction_param()
        split_seed: int = split_seed_param()
        max_samples: int | None = max_samples_param()

        def __post_init__(self) -> None:
            check_split(0.0, self.public_fraction, self.max_samples)

    def _load(self) -> TaskData:
        from defenda.data import load_cifar10_task

        p = self.params
        return load_cifar10_task(p.root, public_fraction=p.public_fraction, split_seed=p.split_seed,
                                 max_samples=p.max_samples)


class MnistTask(CachedTask):
    """MNIST from ROOT/MNIST/raw (28×28 grayscale, 10 classes); official test split."""

    name = "mnist"

    @dataclass(frozen=True)
    class Params:
        root: str = param("data", "directory containing MNIST/raw/ with the four uncompressed idx files")
        model: str = model_param("cnn")
        widths: tuple[int, ...] = widths_param()
        act: str = act_param()
        norm: str = norm_param()
        public_fraction: float = public_fraction_param()
        split_seed: int = split_seed_param()
        max_samples: int | None = max_samples_param()

        def __post_init__(self) -> None:
            check_split(0.0, self.public_fraction, self.max_samples)

    def _load(self) -> TaskData:
        from defenda.data import load_mnist_task

        p = self.params
        return load_mnist_task(p.root, public_fraction=p.public_fraction, split_seed=p.split_seed,
                               max_samples=p.max_samples)


class ImageFolderTask(CachedTask):
    """Your own images in ROOT/<class>/<image>, resized to a square (torchvision ImageFolder)."""

    name = "imagefolder"

    @dataclass(frozen=True)
    class Params:
        root: str = param("data/images", "directory with one sub-directory of images per class")
        image_size: int = param(32, "images are resized to image_size × image_size pixels")
        model: str = model_param("cnn")
        widths: tuple[int, ...] = widths_param()
        act: str = act_param()
        norm: str = norm_param()
        test_fraction: float = test_fraction_param()
        public_fraction: float = public_fraction_param()
        split_seed: int = split_seed_param()
        max_samples: int | None = max_samples_param()

        def __post_init__(self) -> None:
            check_split(self.test_fraction, self.public_fraction, self.max_samples)
            if self.image_size < 1:
                raise ValueError(f"image_size must be at least 1, got {self.image_size}")

    def _load(self) -> TaskData:
        from defenda.data import load_imagefolder_task

        p = self.params
        return load_imagefolder_task(p.root, image_size=p.image_size, test_fraction=p.test_fraction,
                                     public_fraction=p.public_fraction, split_seed=p.split_seed,
                                     max_samples=p.max_samples)
