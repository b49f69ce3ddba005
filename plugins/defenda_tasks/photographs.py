"""Natural images that ship inside installed packages: no files to fetch, no download.

* ``photos`` — 32×32 RGB crops of ten photographs bundled with scikit-image, scikit-learn and
  matplotlib, one class per photograph, spatially disjoint splits;
* ``faces`` — scikit-image's subset of Labeled Faces in the Wild, faces vs non-faces.

Licences of every file: ``docs/data.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from defenda import param
from defenda.data import PHOTOGRAPH_NAMES
from defenda_tasks._common import CachedTask, ConvImageTaskParams, model_param, test_fraction_param

if TYPE_CHECKING:
    from defenda import TaskData


class PhotosTask(CachedTask):
    """32×32 RGB crops of ten bundled photographs (one class each; disjoint regions per split); offline."""

    name = "photos"

    @dataclass(frozen=True)
    class Params(ConvImageTaskParams):
        model: str = model_param("convnet")
        test_fraction: float = test_fraction_param()
        photographs: tuple[str, ...] = param(PHOTOGRAPH_NAMES, "the photographs, one class each (at least two of "
                                             + ", ".join(PHOTOGRAPH_NAMES) + ")")
        scale: int = param(256, "each photograph is resized so its short side has this many pixels, then tiled")
        crop: int = param(32, "side of the square crops in pixels")

        def __post_init__(self) -> None:
            super().__post_init__()
            unknown = [n for n in self.photographs if n not in PHOTOGRAPH_NAMES]
            if unknown:
                raise ValueError(f"unknown photographs {unknown}; choose from {list(PHOTOGRAPH_NAMES)}")
            if len(self.photographs) < 2 or len(set(self.photographs)) != len(self.photographs):
                raise ValueError(f"photographs must be at least two distinct names, got {list(self.photographs)}")
            if not 4 <= self.crop <= self.scale:
                raise ValueError(f"need 4 <= crop <= scale, got crop={self.crop}, scale={self.scale}")

    def _load(self) -> TaskData:
        from defenda.data import load_photos_task

        p = self.params
        return load_photos_task(p.photographs, scale=p.scale, crop=p.crop, test_fraction=p.test_fraction,
                                public_fraction=p.public_fraction, split_seed=p.split_seed,
                                max_samples=p.max_samples)


class FacesTask(CachedTask):
    """Labeled Faces in the Wild subset (scikit-image): 200 real 25×25 grayscale crops, face vs non-face; offline."""

    name = "faces"

    @dataclass(frozen=True)
    class Params(ConvImageTaskParams):
        model: str = model_param("convnet")
        test_fraction: float = test_fraction_param()
        image_size: int = param(25, "side in pixels (25: the crops as shipped; other sizes are resized)")

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.image_size < 4:
                raise ValueError(f"image_size must be at least 4, got {self.image_size}")

    def _load(self) -> TaskData:
        from defenda.data import load_faces_task

        p = self.params
        return load_faces_task(image_size=p.image_size, test_fraction=p.test_fraction,
                               public_fraction=p.public_fraction, split_seed=p.split_seed,
                               max_samples=p.max_samples)
