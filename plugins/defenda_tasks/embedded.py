"""Tasks on scikit-learn's bundled real data: no files, no download."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

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


class DigitsTask(CachedTask):
    """Handwritten digits (scikit-learn, 1797 real 8×8 grayscale images, 10 classes); runs offline."""

    name = "digits"

    @dataclass(frozen=True)
    class Params:
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

    def _load(self) -> TaskData:
        from defenda.data import load_digits_task

        p = self.params
        return load_digits_task(test_fraction=p.test_fraction, public_fraction=p.public_fraction,
                                split_seed=p.split_seed, max_samples=p.max_samples)


class BreastCancerTask(CachedTask):
    """Breast cancer Wisconsin (scikit-learn, 569 × 30 tabular features, 2 classes); runs offline."""

    name = "breast-cancer"

    @dataclass(frozen=True)
    class Params:
        model: str = model_param("mlp", choices=("mlp",))
        widths: tuple[int, ...] = widths_param((200,))
        act: str = act_param()
        test_fraction: float = test_fraction_param()
        public_fraction: float = public_fraction_param()
        split_seed: int = split_seed_param()
        max_samples: int | None = max_samples_param()

        def __post_init__(self) -> None:
            check_split(self.test_fraction, self.public_fraction, self.max_samples)

    def _load(self) -> TaskData:
        from defenda.data import load_breast_cancer_task

        p = self.params
        return load_breast_cancer_task(test_fraction=p.test_fraction, public_fraction=p.public_fraction,
                                       split_seed=p.split_seed, max_samples=p.max_samples)
