"""SPEAR on real embedded data (scikit-learn's digits and breast-cancer sets).

The victim is an MLP 64→1000→10 at initialisation; digits are scaled to [0, 1]
and standardised with one mean and one std, as a user normalises a
single-channel image data set for training. Exactness is PSNR > 100 dB on
every sample in [0, 1] pixel units after Hungarian matching.
"""

from __future__ import annotations

import dataclasses
import math
import statistics

import pytest
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.datasets import load_breast_cancer, load_digits
from torch import nn

from defenda import InputSpace, Knowledge, RoundSettings, SharedUpdate
from defenda.federation.client import compute_update
from defenda.models import MLP, ResNet18, SmallCNN
from defenda.params import validate_params_class
from defenda_attacks._spear_core import SpearParams, spear_recover
from defenda_attacks.spear import Spear, find_linear_relu

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    x = torch.tensor(d.images.reshape(len(d.images), -1) / 16.0, dtype=torch.float64)
    mean, std = x.mean(), x.std()
    return (x - mean) / std, torch.tensor(d.target), mean, std


@pytest.fixture(scope="module")
def cancer():
    d = load_breast_cancer()
    x = torch.tensor(d.data, dtype=torch.float64)
    return (x - x.mean(0)) / x.std(0), torch.tensor(d.target)


def _batch(x, y, B, seed):
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(10_000 + seed))[:B]
    return x[idx], y[idx]


def _victim(n_in, n_out, seed, dtype=torch.float64, width=1000):
    torch.manual_seed(seed)
    return MLP(n_in, n_out, (width,)).to(dtype).eval()


def _knowledge(shape, classes, mean, std, B=None, kind="image", seed=0):
    space = InputSpace(kind, shape, classes, torch.as_tensor(mean).reshape(-1), torch.as_tensor(std).reshape(-1))
    return Knowledge(space=space, batch_size=B, seed=seed)


def _matched_psnr(truth_unit, rec_unit):
    """Per-sample PSNR (data range 1) after Hungarian matching on MSE; -inf for unmatched truths."""
    t = truth_unit.flatten(1).double()
    r = rec_unit.flatten(1).double()
    cost = torch.cdist(t, r, compute_mode="donot_use_mm_for_euclid_dist") ** 2 / t.shape[1]
    ri, ci = linear_sum_assignment(cost.numpy())
    out = torch.full((t.shape[0],), -math.inf, dtype=torch.float64)
    mse = ((t[ri] - r[ci]) ** 2).mean(1)
    out[ri] = 10 * torch.log10(1 / mse.clamp_min(1e-300))
    return out, ri, ci


def _attack_digits(digits, B, seed, dtype=torch.float64, known_batch=True, **params):
    x, y, mean, std = digits
    xb, yb = _batch(x, y, B, seed)
    model = _victim(64, 10, seed, dtype)
    update = compute_update(model, xb.to(dtype), yb)
    kn = _knowledge((64,), 10, mean, std, B if known_batch else None, seed=seed)
    rec = Spear(**params).reconstruct(update, model, kn)
    psnr, ri, ci = _matched_psnr(xb * std + mean, rec.inputs.double() * std + mean)
    return rec, psnr, yb, ri, ci


# ---------------------------------------------------------------------------------------- exactness


@pytest.mark.slow
@pytest.mark.parametrize("B", [4, 8, 12, 16])
def test_exact_recovery_float64_digits(digits, B):
    """PSNR > 100 dB on every sample in at least 95% of 20 batches (each B)."""
    ok = 0
    for seed in range(20):
        rec, psnr, *_ = _attack_digits(digits, B, seed)
        exact = bool((psnr > 100).all())
        ok += exact
        if exact:
            assert rec.info["n_exact_estimate"] == B
    assert ok >= 19, f"B={B}: exact in {ok}/20 batches"


@pytest.mark.parametrize("B", [8, 16])
def test_float32_victim(digits, B):
    for seed in range(3):
        rec, psnr, *_ = _attack_digits(digits, B, seed, dtype=torch.float32)
        assert rec.inputs.dtype == torch.float32
        assert (psnr > 60).all(), psnr


def test_breast_cancer_b8_exact(cancer):
    x, y = cancer
    for seed in range(5):
        xb, yb = _batch(x, y, 8, seed)
        model = _victim(30, 2, seed)
        update = compute_update(model, xb, yb)
        kn = _knowledge((30,), 2, torch.zeros(30), torch.ones(30), 8, kind="tabular", seed=seed)
        rec = Spear().reconstruct(update, model, kn)
        assert rec.inputs.shape == (8, 30)
        err = torch.cdist(xb, rec.inputs.double(), compute_mode="donot_use_mm_for_euclid_dist")
        ri, ci = linear_sum_assignment(err.numpy())
        assert float(err[ri, ci].max()) < 1e-8 * float(xb.norm(dim=1).max())
        assert rec.info["n_exact_estimate"] == 8
        assert (rec.labels[ci] == yb[ri]).all()


@pytest.mark.parametrize("B", [8, 12])
def test_sampling_search_alone(digits, B):
    """The paper's search (random submatrices, sparsity filter, greedy selection), peeling disabled."""
    for seed in range(3):
        rec, psnr, *_ = _attack_digits(digits, B, seed, peel=False)
        assert (psnr > 100).all(), (seed, rec.info)
        assert rec.info["n_peeled"] == 0 and rec.info["proposals_tried"] > 0


def test_unknown_batch_size_from_rank(digits):
    for B in (5, 13):
        rec, psnr, *_ = _attack_digits(digits, B, seed=1, known_batch=False)
        assert rec.info["batch_size_estimate"] == B
        assert rec.inputs.shape[0] == B
        assert (psnr > 100).all()


def test_labels_and_info(digits):
    rec, psnr, yb, ri, ci = _attack_digits(digits, 8, seed=3)
    assert (rec.labels[ci] == yb[ri]).all()
    for key in ("n_exact_estimate", "batch_size_estimate", "proposals_tried", "seconds"):
        assert key in rec.info
    assert rec.info["layer"] == "net.1"


def test_fedavg_delta_one_step(digits):
    x, y, mean, std = digits
    xb, yb = _batch(x, y, 8, 0)
    model = _victim(64, 10, 0)
    update = compute_update(model, xb, yb, RoundSettings(kind="delta", local_steps=1, lr=0.1))
    rec = Spear().reconstruct(update, model, _knowledge((64,), 10, mean, std, 8))
    psnr, *_ = _matched_psnr(xb * std + mean, rec.inputs * std + mean)
    assert (psnr > 100).all()


def test_fedavg_delta_of_several_local_steps_is_recovered_approximately():
    """5 full-batch local steps on the same 8 digits (MLP width 256): rank 8 but no exactly sparse
    columns, so the attack takes the approximate route and says so; measured 63.7 dB median (seeds 0–2;
    the exact search alone: 13.2 dB)."""
    from defenda.data import load_digits_task
    from defenda.metrics import apply_matching, psnr
    from defenda.models import build_model

    data = load_digits_task()
    values = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = build_model("mlp", (64,), 10, widths=(256,))
        idx = torch.randperm(len(data.train[0]), generator=torch.Generator().manual_seed(10_000 + seed))[:8]
        x, y = data.train[0][idx], data.train[1][idx]
        update = compute_update(model, x, y, RoundSettings(kind="delta", local_steps=5, lr=0.1))
        rec = Spear().reconstruct(update, model, Knowledge(space=data.space, batch_size=8, seed=seed, lr=0.1))
        assert rec.info["approximate"] is True and "local steps" in rec.info["message"]
        assert rec.info["refine_loss"] <= rec.info["refine_loss_start"]  # refined (never worse than its start)
        xm, _, matched = apply_matching(x, y, rec, data=data)
        values.append(psnr(data.to_unit(xm), data.to_unit(matched.inputs)))
    assert statistics.median(values) > 40, values


# ---------------------------------------------------------------------------------------- robustness


@pytest.mark.parametrize("rel_sigma", [1e-4, 1e-1])
@pytest.mark.parametrize("known_batch", [True, False])
def test_noisy_gradient_returns_approximate_batch(digits, rel_sigma, known_batch):
    x, y, mean, std = digits
    B = 8
    xb, yb = _batch(x, y, B, 2)
    model = _victim(64, 10, 2)
    update = compute_update(model, xb, yb)
    gen = torch.Generator().manual_seed(0)
    noisy = [t + rel_sigma * t.std() * torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in update.tensors]
    update = update.replace(noisy)
    kn = _knowledge((64,), 10, mean, std, B if known_batch else None)
    rec = Spear(time_budget_s=20).reconstruct(update, model, kn)
    assert rec.inputs.ndim == 2 and rec.inputs.shape[1] == 64 and rec.inputs.shape[0] >= 1
    assert torch.isfinite(rec.inputs).all()
    assert rec.info["approximate"] is True
    assert rec.info["n_exact_estimate"] == 0
    if known_batch:
        assert rec.inputs.shape[0] == B
    if rel_sigma == 1e-4 and known_batch:
        # small noise: the best approximate batch is still close to the truth
        psnr, *_ = _matched_psnr(xb * std + mean, rec.inputs * std + mean)
        assert float(psnr.median()) > 20


def test_noisy_update_best_fit_beats_geiping_at_the_same_batch_size():
    """Gaussian noise std 10⁻³ on the default study's digits MLP (width 256, B = 4, labels recovered):
    the sparsest-directions batch, then the least-squares refinement, which lowers ‖g(X̂) − g̃‖² on every
    seed, lifts the median PSNR by > 3 dB, and beats Geiping's at the same B (measured on seeds 0–4:
    42.8 → 54.0 dB, Geiping 49.3; ``benchmarks/bench_spear_scale.py --noise 1e-3 --geiping``)."""
    from defenda.data import load_digits_task
    from defenda.models import build_model
    from defenda.testing.trials import harness_trial
    from defenda_attacks.geiping import Geiping

    data = load_digits_task()

    def noisy(update, gen):
        return update.replace([t + 1e-3 * torch.randn(t.shape, generator=gen) for t in update.tensors])

    def run(attack, seed):
        return harness_trial(data, lambda: build_model("mlp", (64,), 10, widths=(256,)), attack, seed=seed, batch=4,
                             knowledge={"labels": None}, transform=noisy)

    before, after, geiping = [], [], []
    for seed in range(3):
        plain, refined = run(Spear(refine_iterations=0), seed), run(Spear(), seed)
        assert "refine_loss" not in plain.info
        assert refined.info["refine_loss"] < refined.info["refine_loss_start"], refined.info
        assert refined.info["approximate"] is True and refined.info["n_exact_estimate"] == 0
        before.append(plain.psnr)
        after.append(refined.psnr)
        geiping.append(run(Geiping(), seed).psnr)
    assert statistics.median(after) > statistics.median(before) + 3.0, (before, after)
    assert statistics.median(after) > statistics.median(geiping), (after, geiping)


def test_budget_exhausted_returns_what_it_has():
    """Uncorrelated inputs at B=24 need ~10⁸ proposals; a small budget returns a full batch, flagged."""
    torch.manual_seed(0)
    model = MLP(64, 10, (1000,)).double()
    xb = torch.randn(24, 64, dtype=torch.float64)
    yb = torch.randint(0, 10, (24,))
    update = compute_update(model, xb, yb)
    kn = _knowledge((64,), 10, torch.zeros(1), torch.ones(1), 24, kind="tabular")
    rec = Spear(max_proposals=20_000, dictionary_learning=False).reconstruct(update, model, kn)
    assert rec.inputs.shape == (24, 64)
    assert torch.isfinite(rec.inputs).all()
    assert rec.info["proposals_tried"] >= 20_000
    assert rec.info["n_exact_estimate"] < 24
    assert "budget" in rec.info.get("message", "")


# ---------------------------------------------------------------------------------------- architecture


def test_cnn_recovers_features_exactly(digits):
    x, y, mean, std = digits
    B = 6
    xb, yb = _batch(x, y, B, 4)
    xb = xb.reshape(B, 1, 8, 8)
    torch.manual_seed(4)
    model = SmallCNN(1, 8, 10, hidden=200).double().eval()
    update = compute_update(model, xb, yb)
    kn = _knowledge((1, 8, 8), 10, mean, std, B)
    rec = Spear(feature_inversion_steps=30).reconstruct(update, model, kn)
    assert rec.inputs.shape == (B, 1, 8, 8)
    assert rec.info["layer"] == "classifier.1"
    with torch.no_grad():
        feats = model.features(xb).flatten(1)
    got = torch.tensor(rec.info["features"], dtype=torch.float64)
    err = torch.cdist(feats, got, compute_mode="donot_use_mm_for_euclid_dist")
    ri, ci = linear_sum_assignment(err.numpy())
    assert float(err[ri, ci].max()) < 1e-8 * float(feats.norm(dim=1).max())
    assert rec.info["n_exact_estimate"] == B
    assert (rec.labels[ci] == yb[ri]).all()
    assert "feature_inversion_loss" in rec.info


def test_check_skip_reasons(digits):
    x, y, mean, std = digits
    attack = Spear()
    kn_img = _knowledge((1, 8, 8), 10, mean, std, 8)
    reason = attack.check(ResNet18(1, 10).eval(), None, kn_img)
    assert reason and "ReLU" in reason
    assert attack.check(SmallCNN(1, 8, 10, hidden=64).eval(), None, kn_img) is None
    # batch too large for the layer width, for the input size
    reason = attack.check(MLP(64, 10, (16,)).eval(), None, _knowledge((64,), 10, mean, std, 32))
    assert reason and "width" in reason and "B=32" in reason
    reason = attack.check(MLP(30, 2, (1000,)).eval(), None, _knowledge((30,), 2, 0.0, 1.0, 32, kind="tabular"))
    assert reason and "input size" in reason
    no_bias = nn.Sequential(nn.Flatten(), nn.Linear(64, 100, bias=False), nn.ReLU(), nn.Linear(100, 10))
    reason = attack.check(no_bias, None, _knowledge((64,), 10, mean, std, 8))
    assert reason and "bias" in reason
    # tanh MLP: no ReLU
    reason = attack.check(MLP(64, 10, (100,), act="tanh"), None, _knowledge((64,), 10, mean, std, 8))
    assert reason and "ReLU" in reason


def test_find_layer_first_vs_features():
    mlp = MLP(64, 10, (100, 50))
    layer = find_linear_relu(mlp, (1, 8, 8))
    assert layer.name == "net.1" and layer.is_first
    cnn = SmallCNN(1, 8, 10)
    layer = find_linear_relu(cnn, (1, 8, 8))
    assert layer.name == "classifier.1" and not layer.is_first


# ---------------------------------------------------------------------------------------- plugin contract


def test_params_declared_and_validated():
    assert validate_params_class(Spear.Params) == []
    names = {f.name for f in dataclasses.fields(Spear.Params)}
    assert {"max_proposals", "time_budget_s", "chunk_size", "rank_tol", "sparsity_threshold",
            "feature_inversion_steps"} <= names
    assert Spear(time_budget_s=5).params.time_budget_s == 5.0
    assert Spear.name == "spear"
    assert Spear.Params is SpearParams


def test_docstring_sections():
    doc = Spear.__doc__
    assert doc.strip().splitlines()[0].startswith("SPEAR: ")
    assert "Dimitrov" in doc and "NeurIPS 2024" in doc and "2403.03945" in doc
    heads = ["Paper:", "Threat model:", "Arguments:", "Shapes:", "Example::"]
    at = [doc.index("\n    " + h) for h in heads]
    assert at == sorted(at)
    arguments = doc[at[2]:at[3]]
    for f in dataclasses.fields(Spear.Params):
        assert f"\n        {f.name} (" in arguments, f.name


def _recover_core(digits, B, batch_seed, **kwargs):
    """spear_recover called directly on the gradient of the digits victim's first layer."""
    x, y, _, _ = digits
    xb, yb = _batch(x, y, B, batch_seed)
    model = _victim(64, 10, batch_seed)
    update = compute_update(model, xb, yb)
    g = dict(zip(update.names, update.tensors))
    lin = model.net[1]
    return spear_recover(g["net.1.weight"], g["net.1.bias"], lin.weight, lin.bias, **kwargs), xb


def test_core_params_override(digits):
    """spear_recover reads the search knobs from a SpearParams; without peeling the sampling search does it all."""
    res, _ = _recover_core(digits, 6, 5, batch_size=6, params=SpearParams(peel=False), seed=5)
    assert res.n_peeled == 0 and res.proposals > 0 and res.n_exact == 6


def test_core_runs_without_plugin_system(digits):
    _, _, mean, std = digits
    res, xb = _recover_core(digits, 10, 7)
    assert res.batch_size == 10 and res.n_exact == 10
    psnr, *_ = _matched_psnr(xb * std + mean, res.inputs * std + mean)
    assert (psnr > 100).all()


def test_zero_update_does_not_crash(digits):
    x, y, mean, std = digits
    model = _victim(64, 10, 0)
    update = SharedUpdate(tensors=[torch.zeros_like(p) for p in model.parameters()],
                          names=[n for n, _ in model.named_parameters()])
    rec = Spear().reconstruct(update, model, _knowledge((64,), 10, mean, std, 4))
    assert rec.inputs.shape[1:] == (64,)
    assert rec.info["n_exact_estimate"] == 0


@pytest.mark.parametrize("kind,model", [("image", "cnn"), ("image", "mlp"), ("tabular", "mlp")])
def test_plugin_contract(kind, model):
    from defenda.testing import check_attack, make_tiny_case

    check_attack(Spear, {"feature_inversion_steps": 20}, case=make_tiny_case(kind, model=model))
