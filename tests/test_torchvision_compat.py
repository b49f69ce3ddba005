"""defenda._torchvision_compat: torchvision imports (models, datasets, transforms) on this machine."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from defenda import _torchvision_compat as compat


def test_import_returns_a_usable_torchvision() -> None:
    tv = compat.import_torchvision()
    assert tv.__name__ == "torchvision"
    assert compat.import_torchvision() is tv  # second call: the cached module, nothing redefined
    model = tv.models.resnet18(num_classes=3).eval()
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 3)
    image = tv.transforms.ToTensor()(__import__("PIL.Image").Image.new("RGB", (4, 4)))
    assert image.shape == (3, 4, 4)
    assert hasattr(tv.datasets, "CIFAR10") and hasattr(tv.datasets, "ImageFolder")


def test_lpips_imports_after_the_shim() -> None:
    compat.import_torchvision()
    lpips = pytest.importorskip("lpips")
    assert hasattr(lpips, "LPIPS")


def _run(code: str) -> str:
    """Run ``code`` in a fresh interpreter (a clean sys.modules) and return its stdout."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_plain_import_path_changes_nothing_when_torchvision_works() -> None:
    """With a working torchvision (simulated: the schemas already exist) no library is created."""
    out = _run(
        """
        import torch
        keep = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            if not hasattr(torch.ops.torchvision, op):
                keep.define(op + "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        from defenda import _torchvision_compat as compat
        compat.import_torchvision()
        print(compat._LIBRARY is None)
        """
    )
    assert out == "True"


def test_retry_after_a_failed_import_elsewhere() -> None:
    """A previous failed ``import torchvision`` (e.g. by another library) leaves no stale state behind."""
    out = _run(
        """
        import sys
        try:
            import torchvision
            ok = True
        except RuntimeError:
            ok = False
        from defenda._torchvision_compat import import_torchvision
        tv = import_torchvision()
        from torchvision import datasets, models, transforms
        print(ok or all(sys.modules[n] is not None for n in sys.modules if n.startswith("torchvision")))
        """
    )
    assert out == "True"


def test_unrelated_errors_propagate(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the 'operator torchvision::<known op> does not exist' failure is handled."""
    import builtins

    real_import = builtins.__import__

    def failing_import(name: str, *args: object, **kwargs: object) -> object:
        if name == "torchvision":
            raise RuntimeError("operator torchvision::something_else does not exist")
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", failing_import)
    with pytest.raises(RuntimeError, match="something_else"):
        compat.import_torchvision()
