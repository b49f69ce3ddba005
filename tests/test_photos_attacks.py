"""SPEAR and Stein on the real ``photos`` task (32×32 RGB crops of bundled photographs, d = 3072).

Builders and scoring live in benchmarks/bench_photos_exact.py (the README's table); exact means
PSNR > 100 dB on every sample in unit space after Hungarian matching. SPEAR's exactness needs a
float64 victim (in float32 the gradient's own rounding caps recoveries near 60 dB); the CNN
route runs in float32, the harness's precision.
"""

from __future__ import annotations

import pytest

from conftest import load_benchmark

pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_photos_exact")


@pytest.mark.slow
def test_spear_mlp_photos_b16_exact(bench):
    """MLP 3072→2000→10 at initialisation, labels not given: every one of B = 16 photo crops exact."""
    t = bench.spear_mlp("photos", 16, 0)
    assert t.exact, t.psnr
    assert t.extra["certified"] == 16
    assert min(t.ssim) > 0.999


def test_spear_convnet_route_recovers_features(bench):
    """ConvNet(head=(256,)): the input features of the head's Linear are recovered (certified,
    cosine 1 to float32 precision); the attack reports its inversion fit per sample."""
    t = bench.spear_convnet("photos", 4, 0, feature_inversion_steps=20)
    assert t.extra["certified"] == 4
    assert t.extra["feat_cos"] > 1 - 1e-5
    assert 0 < t.extra["fit"] <= 1 + 1e-6
    assert len(t.psnr) == 4


def test_spear_convnet_info_has_feature_similarity(bench):
    from defenda import Knowledge
    from defenda.federation.client import compute_update
    from defenda.models import build_model
    from defenda_attacks.spear import Spear

    d = bench.task("photos")
    model = build_model("convnet", d.input_shape, d.num_classes, head=(256,)).eval()
    x, y = bench.batch(d, 2, 1)
    rec = Spear(feature_inversion_steps=5).reconstruct(compute_update(model, x, y), model,
                                                       Knowledge(space=d.space, batch_size=2, seed=1))
    assert len(rec.info["feature_similarity"]) == 2
    assert rec.inputs.shape == (2, 3, 32, 32)


def test_stein_photos_gradient_span_b2(bench):
    """Stein at d = 3072, m = 5000, span from ∇_W: B = 2 exact after refinement."""
    t = bench.stein("photos", 2, 0, 5000)
    assert t.exact, t.psnr
