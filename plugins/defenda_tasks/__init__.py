"""Built-in tasks (a plugin package registered through the 'defenda' entry-point group).

* ``digits``, ``breast-cancer`` — scikit-learn's bundled real data (no files needed);
* ``photos``, ``faces`` — photographs and faces bundled with scikit-image, scikit-learn and
  matplotlib (no files needed);
* ``cifar10``, ``mnist``, ``imagefolder`` — read from a local directory, never downloaded.

The task classes live in submodules imported by the hook, so importing this
package stays cheap.
"""

from __future__ import annotations

from typing import Any, Callable

from defenda import hookimpl


@hookimpl
def defenda_register_tasks(register: Callable[[type], Any]) -> None:
    """Register the built-in tasks."""
    from defenda_tasks.embedded import BreastCancerTask, DigitsTask
    from defenda_tasks.photographs import FacesTask, PhotosTask
    from defenda_tasks.torchvision_sets import Cifar10Task, ImageFolderTask, MnistTask

    for cls in (DigitsTask, BreastCancerTask, PhotosTask, FacesTask, Cifar10Task, MnistTask, ImageFolderTask):
        register(cls)
