"""Metrics against hand-computed values; matching; LPIPS availability; the metrics plugin."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from defenda import Reconstruction, TaskData
from defenda import metrics as M
from defenda.metrics import lpips as lpips_module
from defenda.metrics.images import _ssim_win_size

torch.set_num_threads(1)


def _images(b: int = 2, c: int = 1, h: int = 8, w: int = 8, lo: float = 0.2, hi: float = 0.8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (lo + (hi - lo) * torch.rand(b, c, h, w, generator=g)).double()


def _image_task(c: int = 1, h: int = 8, w: int = 8) -> TaskData:
    mean = torch.full((c, 1, 1), 0.3)
    std = torch.full((c, 1, 1), 0.25)
    x = torch.rand(4, c, h, w)
    y = torch.zeros(4, dtype=torch.long)
    split = ((x - mean) / std, y)
    return TaskData("img", "image", (c, h, w), 10, split, split, split, mean, std)


# --------------------------------------------------------------------------- PSNR / MSE


def test_psnr_constant_offset_is_20db():
    a = _images()
    assert M.psnr(a, a + 0.1) == pytest.approx(20.0, abs=1e-9)  # 10·log10(1 / 0.1²)
    assert M.psnr(a, a - 0.01) == pytest.approx(40.0, abs=1e-9)


def test_psnr_is_mean_of_per_image_values_not_psnr_of_mean_mse():
    a = _images()
    b = a.clone()
    b[0] += 0.1  # MSE 0.01   → 20 dB
    b[1] += 0.01  # MSE 0.0001 → 40 dB
    per = M.psnr_per_image(a, b)
    assert per.tolist() == pytest.approx([20.0, 40.0], abs=1e-9)
    assert M.psnr(a, b) == pytest.approx(30.0, abs=1e-9)
    psnr_of_mean_mse = 10 * math.log10(1 / ((0.01 + 0.0001) / 2))  # ≈ 22.97 dB: not what we report
    assert abs(M.psnr(a, b) - psnr_of_mean_mse) > 7


def test_psnr_clamps_to_unit_box_and_caps_exact_recovery():
    zeros = torch.zeros(1, 1, 4, 4)
    assert M.psnr(zeros, torch.full((1, 1, 4, 4), 1.5)) == pytest.approx(0.0)  # clamped to 1 → MSE 1
    assert M.psnr(zeros, torch.full((1, 1, 4, 4), -3.0)) == M.PSNR_CAP_DB  # clamped to 0 → identical
    a = _images()
    assert M.psnr(a, a) == M.PSNR_CAP_DB
    # float32 rounding error is a real, finite, very high value (not the cap)
    near = (a.float() + 1e-7).double()
    assert 100 < M.psnr(a, near) < M.PSNR_CAP_DB


def test_psnr_nan_reconstruction_is_scored_not_propagated():
    a = torch.full((1, 1, 2, 2), 0.5)
    b = torch.full((1, 1, 2, 2), float("nan"))  # NaN → 0, MSE 0.25 → 10·log10(4)
    assert M.psnr(a, b) == pytest.approx(10 * math.log10(4))


def test_mse_per_sample_mean():
    a = torch.zeros(2, 3)
    b = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 3.0]])
    assert M.mse_per_image(a, b).tolist() == pytest.approx([1.0, 3.0])
    assert M.mse(a, b) == pytest.approx(2.0)


# --------------------------------------------------------------------------- SSIM


def _ssim_valid_conv(a: torch.Tensor, b: torch.Tensor) -> float:
    """Independent SSIM: Wang et al. with an 11-tap σ=1.5 Gaussian, 'valid' convolution, mean map."""
    r = 5
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    g1 = torch.exp(-(t**2) / (2 * 1.5**2))
    g1 = g1 / g1.sum()
    k = (g1[:, None] * g1[None, :])[None, None]
    c1, c2 = 0.01**2, 0.03**2
    vals = []
    for ia, ib in zip(a, b):
        chans = []
        for ca, cb in zip(ia, ib):
            x, y = ca[None, None], cb[None, None]
            f = lambda z: torch.nn.functional.conv2d(z, k)  # noqa: E731
            mx, my = f(x), f(y)
            vx, vy, cxy = f(x * x) - mx**2, f(y * y) - my**2, f(x * y) - mx * my
            s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
            chans.append(s.mean())
        vals.append(torch.stack(chans).mean())
    return float(torch.stack(vals).mean())


def test_ssim_identical_is_one():
    a = _images(c=3, h=32, w=32)
    assert M.ssim(a, a) == pytest.approx(1.0)
    d = _images(c=1, h=8, w=8)  # smaller than the 11-pixel window: no error
    assert M.ssim(d, d) == pytest.approx(1.0)


@pytest.mark.parametrize("side", [32, 8])
def test_ssim_constant_images_hand_computed(side):
    # constant images: σx = σy = σxy = 0, so SSIM = (2pq + C1) / (p² + q² + C1)
    p, q = 0.5, 0.6
    a = torch.full((1, 1, side, side), p, dtype=torch.float64)
    b = torch.full((1, 1, side, side), q, dtype=torch.float64)
    expected = (2 * p * q + 0.01**2) / (p**2 + q**2 + 0.01**2)
    assert M.ssim(a, b) == pytest.approx(expected, abs=1e-12)


def test_ssim_matches_independent_valid_convolution():
    a = _images(b=2, c=3, h=32, w=32, lo=0.0, hi=1.0, seed=1)
    noise = 0.1 * torch.randn(a.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    b = (a + noise).clamp(0, 1)
    got = M.ssim(a, b)
    assert got == pytest.approx(_ssim_valid_conv(a, b), abs=1e-10)
    assert 0 < got < 1


def test_ssim_small_images_use_largest_odd_window():
    assert _ssim_win_size(8, 8) == 7
    assert _ssim_win_size(32, 32) == 11
    assert _ssim_win_size(7, 12) == 7
    a = _images(c=1, h=8, w=8, lo=0, hi=1, seed=3)
    b = _images(c=1, h=8, w=8, lo=0, hi=1, seed=4)
    assert -1 < M.ssim(a, b) < 0.9


# --------------------------------------------------------------------------- matching


def test_match_recovers_known_permutation():
    x = _images(b=5, c=1, h=4, w=4, lo=0, hi=1, seed=5)
    perm = torch.tensor([3, 0, 4, 1, 2])
    rec = x[perm] + 0.001
    rows, cols = M.match(x, rec)
    assert rows.tolist() == [0, 1, 2, 3, 4]
    # truth i was put at the position j where perm[j] == i
    assert [int(perm[c]) for c in cols] == rows.tolist()
    _, _, matched = M.apply_matching(x, torch.arange(5), Reconstruction(rec, labels=perm.clone()))
    assert torch.allclose(matched.inputs, x + 0.001)
    assert matched.labels.tolist() == [0, 1, 2, 3, 4]
    assert matched.info["matched_fraction"] == 1.0


def test_unmatched_truth_gets_blank_guess_and_wrong_label():
    x = _images(b=3, c=1, h=4, w=4, lo=0, hi=1, seed=6)
    y = torch.tensor([7, 8, 9])
    rec = Reconstruction(x[[2]].clone(), labels=torch.tensor([9]), info={"loss": 0.5})
    xm, ym, rm = M.apply_matching(x, y, rec)
    assert torch.equal(xm, x) and torch.equal(ym, y)
    assert rm.inputs.shape == x.shape
    assert torch.equal(rm.inputs[2], x[2])
    assert torch.count_nonzero(rm.inputs[:2]) == 0  # zeros in model space = the data mean
    assert rm.labels.tolist() == [M.UNMATCHED_LABEL, M.UNMATCHED_LABEL, 9]
    assert M.label_accuracy(ym, rm.labels) == pytest.approx(1 / 3)
    assert rm.info == {"loss": 0.5, "matched_fraction": pytest.approx(1 / 3), "num_reconstructed": 1,
                       "matched_mask": [False, False, True]}
    assert rec.inputs.shape[0] == 1  # the attack's object is not modified


def test_extra_reconstructions_are_dropped():
    x = _images(b=2, c=1, h=4, w=4, lo=0, hi=1, seed=7)
    junk = torch.full((3, 1, 4, 4), 5.0, dtype=torch.float64)
    rec = Reconstruction(torch.cat([junk, x[[1, 0]]]))
    _, _, rm = M.apply_matching(x, torch.zeros(2), rec)
    assert torch.equal(rm.inputs, x)
    assert rm.labels is None
    assert rm.info["matched_fraction"] == 1.0 and rm.info["num_reconstructed"] == 5


def test_matching_in_unit_space_with_task_data():
    data = _image_task(h=1, w=2)
    x = data.to_model(torch.tensor([[1.0, 0.0], [0.5, 1.0]]).reshape(2, 1, 1, 2))
    # A = (10, 0.9) clamps to (1, 0.9): in the box it is nearer truth 1 (0.26 vs 0.81), unclamped
    # nearer truth 0 (81.81 vs 90.26); B = (0.75, 0.5) is equally far from both (0.3125).
    rec = data.to_model(torch.tensor([[10.0, 0.9], [0.75, 0.5]]).reshape(2, 1, 1, 2))
    _, _, rm = M.apply_matching(x, torch.zeros(2), Reconstruction(rec), data=data)  # unit space
    assert torch.allclose(rm.inputs, rec[[1, 0]])
    _, _, rm_model = M.apply_matching(x, torch.zeros(2), Reconstruction(rec))  # model space
    assert torch.allclose(rm_model.inputs, rec)


def test_match_tolerates_nan_reconstructions():
    x = _images(b=2, c=1, h=2, w=2, lo=0, hi=1, seed=8)
    rec = torch.stack([torch.full_like(x[0], float("nan")), x[0]])
    rows, cols = M.match(x, rec)
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 1, 1: 0}


# --------------------------------------------------------------------------- labels and tabular


def test_label_accuracy():
    assert M.label_accuracy(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 0, 3])) == pytest.approx(0.75)
    assert M.label_accuracy(torch.tensor([1, 2]), None) is None


def test_mae_on_continuous_features_only():
    a = torch.zeros(2, 3)
    b = torch.tensor([[1.0, 2.0, 100.0], [3.0, -2.0, 100.0]])
    assert M.mae(a, b, discrete=(2,)) == pytest.approx((1 + 2 + 3 + 2) / 4)
    assert M.mae(a, b) == pytest.approx((1 + 2 + 100 + 3 + 2 + 100) / 6)
    assert M.mae(a, b, discrete=(0, 1, 2)) is None
    nan = torch.tensor([[float("nan"), 1.0, 0.0], [0.0, 0.0, 0.0]])  # NaN counts as the blank guess 0
    assert M.mae(torch.ones(2, 3), nan) == pytest.approx((1 + 0 + 1 + 1 + 1 + 1) / 6)


def test_feature_accuracy_snaps_to_support():
    a = torch.tensor([[0.0, 1.0], [2.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[0.4, 0.1], [1.6, 0.2], [float("nan"), 0.9]])
    # feature 0 takes {0, 1, 2}: 0.4→0 ✓, 1.6→2 ✓, NaN ✗
    # feature 1 takes {0, 1}:    0.1→0 ✗, 0.2→0 ✓, 0.9→1 ✓
    sup = [torch.tensor([0.0, 1.0, 2.0]), torch.tensor([0.0, 1.0])]
    assert M.feature_accuracy(a, b, (0, 1), sup) == pytest.approx(4 / 6)
    assert M.feature_accuracy(a, b, (1,)) == pytest.approx(2 / 3)  # round to integers
    assert M.feature_accuracy(a, b, ()) is None


# --------------------------------------------------------------------------- LPIPS


def _need_lpips() -> None:
    """Skip unless the lpips package imports (torchvision first, through defenda's compat shim)."""
    from defenda._torchvision_compat import import_torchvision

    import_torchvision()
    pytest.importorskip("lpips")


@pytest.fixture
def fresh_lpips(monkeypatch, tmp_path):
    """An empty torch home (no AlexNet weights) and a clean LPIPS cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(M.LPIPS_BACKBONE_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    lpips_module._reset_lpips_state()
    yield tmp_path
    lpips_module._reset_lpips_state()


def test_lpips_unavailable_returns_none_and_warns_once(fresh_lpips):
    a, b = _images(), _images(seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert M.lpips_distance(a, b) is None
        assert M.lpips_per_image(a, b) is None
        assert M.load_lpips() is None
    got = [w for w in caught if issubclass(w.category, M.LPIPSUnavailableWarning)]
    assert len(got) == 1
    msg = str(got[0].message)
    assert M.ALEXNET_CHECKPOINT in msg and str(fresh_lpips / "torch" / "hub" / "checkpoints") in msg
    assert M.LPIPS_BACKBONE_ENV in msg
    assert M.lpips_backbone_status()[0] is None


def test_lpips_missing_explicit_path_is_named(fresh_lpips):
    with pytest.warns(M.LPIPSUnavailableWarning, match="nowhere.pth"):
        assert M.lpips_distance(_images(), _images(seed=1), backbone_path=str(fresh_lpips / "nowhere.pth")) is None


def test_lpips_with_random_backbone_for_tests_only(fresh_lpips):
    # Explicitly a RANDOM AlexNet trunk (allow_random_backbone=True): values are meaningless
    # as LPIPS; this only checks the plumbing (grayscale → RGB, 8×8 upsampling, zero on identity).
    _need_lpips()
    a, b = _images(b=3), _images(b=3, seed=1)
    rng = torch.get_rng_state()
    same = M.lpips_per_image(a, a, allow_random_backbone=True)
    assert torch.equal(torch.get_rng_state(), rng)  # building the model leaves the global RNG alone
    diff = M.lpips_per_image(a, b, allow_random_backbone=True)
    assert same is not None and diff is not None
    assert same.shape == (3,) and torch.allclose(same, torch.zeros(3, dtype=torch.float64), atol=1e-6)
    assert bool((diff > 0).all())
    rgb = _images(b=2, c=3, h=32, w=32)
    assert M.lpips_distance(rgb, rgb.flip(-1), allow_random_backbone=True) > 0
    assert M.load_lpips(allow_random_backbone=True) is M.load_lpips(allow_random_backbone=True)  # cached


def test_lpips_loads_alexnet_checkpoint_from_path(fresh_lpips, monkeypatch):
    _need_lpips()
    from defenda._torchvision_compat import import_torchvision

    tv = import_torchvision()
    torch.manual_seed(0)
    alex = tv.models.alexnet(weights=None)  # a stand-in checkpoint with torchvision's key layout
    ckpt = fresh_lpips / "alex.pth"
    torch.save(alex.state_dict(), ckpt)
    monkeypatch.setenv(M.LPIPS_BACKBONE_ENV, str(ckpt))
    assert M.lpips_backbone_status()[0] == ckpt
    model = M.load_lpips()
    assert model is not None
    assert torch.equal(getattr(model.net.slice1, "0").weight, alex.features[0].weight)
    assert torch.equal(getattr(model.net.slice5, "10").bias, alex.features[10].bias)
    a = _images()
    assert M.lpips_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_lpips_bad_checkpoint_is_unavailable(fresh_lpips):
    _need_lpips()
    bad = fresh_lpips / "bad.pth"
    torch.save({"foo": torch.zeros(1)}, bad)
    with pytest.warns(M.LPIPSUnavailableWarning, match="not an AlexNet checkpoint"):
        assert M.lpips_distance(_images(), _images(seed=1), backbone_path=str(bad)) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the failure is cached and was reported once
        assert M.lpips_distance(_images(), _images(seed=1), backbone_path=str(bad)) is None


# --------------------------------------------------------------------------- plugin


def _plugin_classes() -> dict[str, type]:
    import defenda_metrics

    out: list[type] = []
    defenda_metrics.defenda_register_metrics(out.append)
    return {cls.name: cls for cls in out}


def test_plugin_registers_valid_metrics():
    from defenda.registry import _validate

    classes = _plugin_classes()
    assert set(classes) == {"psnr", "ssim", "lpips", "label-acc", "mse", "tabular", "success"}
    for cls in classes.values():
        assert _validate("metric", cls) == [], cls
    assert classes["tabular"].columns == ("mae", "feature_acc")
    assert classes["tabular"].task_kinds == frozenset({"tabular"})
    assert classes["label-acc"].columns == ("label_acc",)
    assert classes["label-acc"].task_kinds == frozenset({"image", "tabular"})
    assert classes["success"].columns == ("exact_rate", "recognised_rate", "ident_acc")
    assert classes["lpips"](backbone_path="/x.pth").params.backbone_path == "/x.pth"


def test_plugin_is_import_light():
    code = (
        "import sys, defenda_metrics; heavy = [m for m in ('skimage', 'scipy', 'lpips', 'torchvision') "
        "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def test_plugin_image_metrics_work_in_model_space(fresh_lpips):
    classes = _plugin_classes()
    data = _image_task()
    unit = _images(b=2)
    x = data.to_model(unit)
    recon = Reconstruction(data.to_model(unit + 0.1), labels=torch.tensor([0, 5]))
    y = torch.tensor([0, 4])
    assert classes["psnr"]().compute(x, y, recon, data)["psnr"] == pytest.approx(20.0, abs=1e-6)
    assert classes["mse"]().compute(x, y, recon, data)["mse"] == pytest.approx(0.01, abs=1e-9)
    assert classes["ssim"]().compute(x, y, Reconstruction(x.clone()), data)["ssim"] == pytest.approx(1.0)
    assert classes["label-acc"]().compute(x, y, recon, data) == {"label_acc": 0.5}
    with pytest.warns(M.LPIPSUnavailableWarning):
        assert classes["lpips"]().compute(x, y, recon, data) == {"lpips": None}


def test_plugin_tabular_metrics():
    classes = _plugin_classes()
    mean, std = torch.tensor([0.0, 10.0, 0.0]), torch.tensor([1.0, 2.0, 1.0])
    raw = torch.tensor([[0.0, 10.0, 1.0], [1.0, 12.0, 0.0], [2.0, 8.0, 1.0]])
    split = ((raw - mean) / std, torch.zeros(3, dtype=torch.long))
    data = TaskData("tab", "tabular", (3,), 2, split, split, split, mean, std, discrete_features=(2,))
    x = data.to_model(raw[:2])
    rec_raw = torch.tensor([[0.5, 11.0, 0.8], [1.0, 12.0, 0.7]])  # feature 2: 0.8→1 ✓, 0.7→1 ✗
    recon = Reconstruction(data.to_model(rec_raw))
    out = classes["tabular"]().compute(x, torch.zeros(2), recon, data)
    # standardised errors on features 0 and 1: |0.5|/1, |1|/2, 0, 0
    assert out["mae"] == pytest.approx((0.5 + 0.5 + 0 + 0) / 4)
    assert out["feature_acc"] == pytest.approx(0.5)
    assert classes["mse"]().compute(x, torch.zeros(2), recon, data)["mse"] == pytest.approx(
        float(np.mean([(0.25 + 0.25 + 0.04) / 3, 0.49 / 3])), rel=1e-6
    )
