"""The ``stein`` attack (Wang, Lee, Lei, AISTATS 2023) on real embedded data.

Data: scikit-learn's bundled handwritten digits (8×8, d = 64), ``images / 16`` in [0, 1],
in model space ``(x - mean) / std`` with one scalar mean/std from the training split
(the convention of defenda's digits task). No unit-norm assumption: the attacker scales
its Gaussian first layer by the median norm of the public split (≈ 8 here).

Quality is the mean |cos| between reconstructions and the truth after Hungarian
matching on |cos| (B = 4, batch size *not* granted: estimated from the rank of ∇_W).
The quality and rate tests use the tensor step alone (``refine_steps = 0``).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from defenda import Knowledge, SharedUpdate, TaskData, UnsupportedError
from defenda.federation.client import compute_update
from defenda.params import validate_params_class
from defenda_attacks import _stein_core as core
from defenda_attacks.stein import Stein

torch.set_num_threads(1)

B = 4


@pytest.fixture(scope="module")
def digits() -> TaskData:
    from sklearn.datasets import load_digits

    raw = load_digits()
    x = torch.tensor(raw.images / 16.0, dtype=torch.float32)[:, None]  # (N, 1, 8, 8) in [0, 1]
    y = torch.tensor(raw.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    n_tr, n_te = 1258, 180
    mean, std = x[:n_tr].mean(), x[:n_tr].std()
    xm = (x - mean) / std
    return TaskData(
        name="digits",
        kind="image",
        input_shape=(1, 8, 8),
        num_classes=10,
        train=(xm[:n_tr], y[:n_tr]),
        test=(xm[n_tr : n_tr + n_te], y[n_tr : n_tr + n_te]),
        public=(xm[n_tr + n_te :], y[n_tr + n_te :]),
        mean=mean.reshape(1, 1, 1),
        std=std.reshape(1, 1, 1),
    )


def _knowledge(data: TaskData, seed: int, **kw) -> Knowledge:
    return Knowledge(space=data.space, seed=seed, **kw)


def _batch(data: TaskData, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.randperm(len(data.train[0]), generator=torch.Generator().manual_seed(1000 + seed))[:B]
    return data.train[0][idx], data.train[1][idx]


def _match(x: torch.Tensor, xhat: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hungarian matching on |cos|: (truth index, reconstruction index, signed cos)."""
    a = x.reshape(len(x), -1).double()
    b = xhat.reshape(len(xhat), -1).double()
    c = (a / a.norm(dim=1, keepdim=True)) @ (b / b.norm(dim=1, keepdim=True)).T
    r, k = linear_sum_assignment(-c.abs().numpy())
    return r, k, c[r, k].numpy()


def _attack(data: TaskData, seed: int, **params):
    params.setdefault("refine_steps", 0)  # the tensor step alone (module docstring)
    torch.manual_seed(seed)
    att = Stein(**params)
    model = att.prepare_model(torch.nn.Linear(1, 1), data)
    x, y = _batch(data, seed)
    update = compute_update(model, x, y)
    rec = att.reconstruct(update, model, _knowledge(data, seed))
    r, k, cos = _match(x, rec.inputs)
    return x, y, rec, r, k, cos


# --------------------------------------------------------------------------- quality


def test_tanh_quality(digits: TaskData) -> None:
    """tanh, m = 1e5: mean |cos| ≥ 0.99 (measured 0.9999), signs, labels and norms resolved."""
    for seed in range(3):
        x, y, rec, r, k, cos = _attack(digits, seed, width=100_000, activation="tanh")
        assert rec.inputs.shape == (B, 1, 8, 8)
        assert rec.info["batch_size_est"] == B and rec.info["span"] == "gradient" and rec.info["order"] == 3
        assert np.abs(cos).mean() >= 0.99, cos
        assert (cos > 0).all(), "sign not resolved (cross-entropy residual pattern)"
        assert torch.equal(rec.labels[k], y[r])
        rel = (rec.inputs[k] - x[r]).flatten(1).norm(dim=1) / x[r].flatten(1).norm(dim=1)
        assert float(rel.max()) < 0.1, rel


def test_relu_order4_quality(digits: TaskData) -> None:
    """ReLU, order 4 (auto), m = 2e5: mean |cos| ≥ 0.98 (measured ≈ 0.9998); sign by pattern fit,
    norm by cross-entropy consistency."""
    for seed in range(2):
        x, y, rec, r, k, cos = _attack(digits, seed, width=200_000, activation="relu")
        assert rec.info["order"] == 4 and rec.info["batch_size_est"] == B
        assert np.abs(cos).mean() >= 0.98, cos
        assert (cos > 0).all()
        assert torch.equal(rec.labels[k], y[r])
        rel = (rec.inputs[k] - x[r]).flatten(1).norm(dim=1) / x[r].flatten(1).norm(dim=1)
        assert float(rel.max()) < 0.1, rel


def test_error_falls_like_inverse_sqrt_m(digits: TaskData) -> None:
    """Direction error sin∠(x̂, x) over a decade of m (tanh, tensor step only): log-log slope in
    [-0.7, -0.3] (measured ≈ -0.45; theory -0.5)."""
    widths = [10_000, 31_623, 100_000]
    errs = []
    for m in widths:
        e = []
        for seed in range(4):
            *_, cos = _attack(digits, seed, width=m, activation="tanh")
            e.append(np.sqrt(np.clip(1 - cos**2, 0, None)).mean())
        errs.append(float(np.mean(e)))
    slope = np.polyfit(np.log(widths), np.log(errs), 1)[0]
    assert -0.7 <= slope <= -0.3, (slope, errs)


def test_refinement_reaches_the_exact_batch(digits: TaskData) -> None:
    """Gradient matching of ∇_A in the recovered span: the model there is exact, so the batch is recovered
    to float32 precision, norms and labels included."""
    x, y, rec, r, k, cos = _attack(digits, 0, width=20_000, activation="tanh", refine_steps=20)
    assert np.abs(cos).min() > 1 - 1e-8
    rel = (rec.inputs[k] - x[r]).flatten(1).norm(dim=1) / x[r].flatten(1).norm(dim=1)
    assert float(rel.max()) < 1e-3, rel
    assert torch.equal(rec.labels[k], y[r])
    assert rec.info["refine_residual"] < 1e-5


def test_span_from_order2_tensor_without_weight_gradient(digits: TaskData) -> None:
    """Option B (no ∇_W, ReLU): the span and B̂ come from the order-2 estimator."""
    torch.manual_seed(0)
    att = Stein(width=100_000, activation="relu")
    model = att.prepare_model(torch.nn.Linear(1, 1), digits)
    x, y = _batch(digits, 0)
    update = compute_update(model, x, y)
    tensors = [torch.zeros_like(t) if t.dim() == 2 and t.shape == model[1].weight.shape else t for t in update.tensors]
    rec = att.reconstruct(update.replace(tensors), model, _knowledge(digits, 0))
    assert rec.info["span"] == "order2" and rec.info["batch_size_est"] == B
    _, _, cos = _match(x, rec.inputs)
    assert np.abs(cos).mean() >= 0.98, cos


def test_same_label_samples_and_granted_batch_size(digits: TaskData) -> None:
    """Two samples of one class have (nearly) equal residual rows; the decomposition still separates them."""
    ys = digits.train[1]
    i0, i1 = (ys == 3).nonzero()[:2, 0].tolist()
    j0, j1 = (ys == 7).nonzero()[0, 0].item(), (ys == 1).nonzero()[0, 0].item()
    idx = torch.tensor([i0, i1, j0, j1])
    x, y = digits.train[0][idx], ys[idx]
    torch.manual_seed(5)
    att = Stein(width=100_000, activation="tanh")
    model = att.prepare_model(torch.nn.Linear(1, 1), digits)
    rec = att.reconstruct(compute_update(model, x, y), model, _knowledge(digits, 5, batch_size=B))
    r, k, cos = _match(x, rec.inputs)
    assert np.abs(cos).mean() >= 0.99, cos
    assert torch.equal(rec.labels[k], y[r])


# --------------------------------------------------------------------------- contract and core math


def test_params_contract_and_model_shape(digits: TaskData) -> None:
    assert validate_params_class(Stein.Params) == []
    assert Stein.name == "stein" and Stein.requires.server == "malicious"
    att = Stein(width=1000, activation="relu")
    model = att.prepare_model(torch.nn.Linear(1, 1), digits)
    lin1, lin2 = model[1], model[3]
    assert isinstance(model, torch.nn.Sequential) and isinstance(model[0], torch.nn.Flatten)
    assert lin1.weight.shape == (1000, 64) and lin1.bias is None and lin2.weight.shape == (10, 1000)
    assert torch.equal(lin1.weight[500:], -lin1.weight[:500])  # antithetic pairs for order 4
    rho = float(digits.public[0].flatten(1).norm(dim=1).median())
    assert abs(float(lin1.weight.detach().std()) * rho - 1) < 0.05  # rows N(0, I/ρ̄²)
    assert torch.allclose(lin2.weight.abs(), torch.full_like(lin2.weight, 1e-3))
    assert att.check(model, digits, _knowledge(digits, 0)) is None
    other = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    assert isinstance(att.check(other, digits, _knowledge(digits, 0)), str)
    with pytest.raises(UnsupportedError):
        att.reconstruct(SharedUpdate([], [], kind="delta"), model, _knowledge(digits, 0))


def test_hermite_coefficients_match_closed_forms() -> None:
    mu = core.hermite_coefficients("relu")
    assert (
        abs(mu[2] - 1 / math.sqrt(2 * math.pi)) < 1e-5
        and abs(mu[3]) < 1e-5
        and abs(mu[4] + 1 / math.sqrt(2 * math.pi)) < 1e-5
    )
    mu = core.hermite_coefficients("tanh")
    assert abs(mu[2]) < 1e-9 and abs(mu[4]) < 1e-9 and abs(mu[3] + 0.3636) < 1e-3
    assert core.auto_order("tanh") == 3 and core.auto_order("sigmoid", 2.0) == 3
    assert core.auto_order("relu") == 4 and core.auto_order("gelu") == 4 and core.auto_order("softplus") == 4


@pytest.mark.parametrize("order", [3, 4])
def test_stein_estimator_is_unbiased(order: int) -> None:
    """E[y(u) He_p(u)] = Σ_i r_i μ_p v_i^{⊗p} for unit v_i, checked at m = 4e5 in B = 3 dimensions."""
    g = torch.Generator().manual_seed(order)
    Bd, m = 3, 400_000
    act = "tanh" if order == 3 else "relu"
    Vt = torch.randn(Bd, Bd, generator=g, dtype=torch.float64)
    Vt = Vt / Vt.norm(dim=0)
    r = torch.tensor([[1.0, -0.7, 0.5]], dtype=torch.float64)
    U = torch.randn(m, Bd, generator=g, dtype=torch.float64)
    U = torch.cat([U, -U]) if order == 4 else U
    Y = r @ core.act_fn(act)(U @ Vt).T
    T = core.hermite_moment(Y - Y.mean(), U, order)[0].numpy()
    expected = (core._design(Vt.numpy(), order) @ (r[0].numpy() * core.hermite_coefficients(act)[order])).reshape(
        T.shape
    )
    assert np.abs(T - expected).max() < 0.06 * np.abs(expected).max()  # measured 0.025 (Monte-Carlo noise)


def test_jennrich_and_cp_refinement_recover_nonorthogonal_components() -> None:
    rng = np.random.default_rng(0)
    for order in (3, 4):
        Vt = rng.standard_normal((4, 4)) + 1.5  # correlated, like digits
        Vt /= np.linalg.norm(Vt, axis=0)
        lam = rng.standard_normal((4, 3))
        T = (core._design(Vt, order) @ lam).T.reshape((3,) + (4,) * order)
        T = T + 1e-4 * rng.standard_normal(T.shape)
        Vc, _, res, _ = core.decompose(T, 4, restarts=5, rng=rng, lm_iter=20)
        c = np.abs(Vt.T @ Vc)
        r, k = linear_sum_assignment(-c)
        assert c[r, k].min() > 0.999 and res < 1e-3


@pytest.mark.parametrize("kind", ["image", "tabular"])
def test_contract_on_the_tiny_cases(kind: str) -> None:
    """defenda.testing's contract checks (shapes, determinism, model untouched) on both tiny cases."""
    from defenda.testing import check_attack, make_tiny_case

    rec = check_attack(Stein, {"width": 4000}, case=make_tiny_case(kind))
    assert rec.info["batch_size_est"] == 2
    assert json.dumps(rec.info)


def test_the_core_uses_the_shared_rank_estimate() -> None:
    from defenda_attacks import _linalg

    assert core.estimate_rank is _linalg.estimate_rank
