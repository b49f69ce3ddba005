"""Tasks on image sets read from a local directory with torchvision's loaders (never downloaded)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from defenda import param
from defenda_tasks._common import CachedTask, ImageTaskParams, test_fraction_param

if TYPE_CHECKING:
    from defenda import TaskData


class Cifar10Task(CachedTask):
    """CIFAR-10 from ROOT/cifar-10-batches-py (32×32 RGB, 10 classes); official test split."""

    name = "cifar10"

    @dataclass(frozen=True)
    class Params(ImageTaskParams):
        root: str = param("data", "directory containing cifar-10-batches-py/ (the extracted python version)")

    def _load(self) -> TaskData:
        from defenda.data import load_cifar10_task

        p = self.params
        return load_cifar10_task(p.root, public_fraction=p.public_fraction, split_seed=p.split_seed,
                                 max_samples=p.max_samples)


class MnistTask(CachedTask):
    """MNIST from ROOT/MNIST/raw (28×28 grayscale, 10 classes); official test split."""

    name = "mnist"

    @dataclass(frozen=True)
    class Params(ImageTaskParams):
        root: str = param("data", "directory containing MNIST/raw/ with the four uncompressed idx files")

    def _load(self) -> TaskData:
        from defenda.data import load_mnist_task

        p = self.params
        return load_mnist_task(p.root, public_fraction=p.public_fraction, split_seed=p.split_seed,
                               max_samples=p.max_samples)


class ImageFolderTask(CachedTask):
    """Your own images in ROOT/<class>/<image>, resized to a square (torchvision ImageFolder)."""

    name = "imagefolder"

    @dataclass(frozen=True)
    class Params(ImageTaskParams):
        root: str = param("data/images", "directory with one sub-directory of images per class")
        image_size: int = param(32, "images are resized to image_size × image_size pixels")
        test_fraction: float = test_fraction_param()

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.image_size < 1:
                raise ValueError(f"image_size must be at least 1, got {self.image_size}")

    def _load(self) -> TaskData:
        from defenda.data import load_imagefolder_task

        p = self.params
        return load_imagefolder_task(p.root, image_size=p.image_size, test_fraction=p.test_fraction,
                                     public_fraction=p.public_fraction, split_seed=p.split_seed,
                                     max_samples=p.max_samples)
