"""Tasks on scikit-learn's bundled real data: no files, no download."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from defenda_tasks._common import CachedTask, ImageTaskParams, TaskParams, model_param, test_fraction_param

if TYPE_CHECKING:
    from defenda import TaskData


class DigitsTask(CachedTask):
    """Handwritten digits (scikit-learn, 1797 real 8×8 grayscale images, 10 classes); runs offline."""

    name = "digits"

    @dataclass(frozen=True)
    class Params(ImageTaskParams):
        test_fraction: float = test_fraction_param()

    def _load(self) -> TaskData:
        from defenda.data import load_digits_task

        p = self.params
        return load_digits_task(test_fraction=p.test_fraction, public_fraction=p.public_fraction,
                                split_seed=p.split_seed, max_samples=p.max_samples)


class BreastCancerTask(CachedTask):
    """Breast cancer Wisconsin (scikit-learn, 569 × 30 tabular features, 2 classes); runs offline."""

    name = "breast-cancer"

    @dataclass(frozen=True)
    class Params(TaskParams):
        model: str = model_param("mlp", choices=("mlp",))
        test_fraction: float = test_fraction_param()

    def _load(self) -> TaskData:
        from defenda.data import load_breast_cancer_task

        p = self.params
        return load_breast_cancer_task(test_fraction=p.test_fraction, public_fraction=p.public_fraction,
                                       split_seed=p.split_seed, max_samples=p.max_samples)
