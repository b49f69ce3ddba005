"""Inverting Gradients (``geiping``) and the shared inversion helpers (``defenda.inversion``)."""

from __future__ import annotations

import statistics

import pytest
import torch
from sklearn.datasets import load_digits

from defenda import InputSpace, Knowledge, RoundSettings, SharedUpdate
from defenda.federation.client import compute_update, weight_delta
from defenda.inversion import (
    estimate_batch_size,
    gradient_matching_loss,
    multistep_schedule,
    parameter_gradients,
    recover_labels,
    simulate_delta,
    total_variation,
)
from defenda.models import MLP, SmallCNN
from defenda_attacks.geiping import Geiping

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Real 8×8 digits in model space: (x, y, mean, std), mean/std shaped (1, 1, 1)."""
    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
    mean, std = x.mean().reshape(1, 1, 1), x.std().reshape(1, 1, 1)
    return (x - mean) / std, torch.tensor(d.target), mean, std


def _knowledge(mean: torch.Tensor, std: torch.Tensor, labels: torch.Tensor | None = None) -> Knowledge:
    return Knowledge(space=InputSpace("image", (1, 8, 8), 10, mean, std), labels=labels,
                     batch_size=None if labels is None else len(labels))


def _psnr(rec: torch.Tensor, truth: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> list[float]:
    """Per-image PSNR in [0, 1] space (MAX = 1), rows matched in order."""
    a, b = (rec * std + mean).clamp(0, 1), (truth * std + mean).clamp(0, 1)
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return (10 * torch.log10(1 / mse)).tolist()


def _trial(digits, seed: int, *, batch: int = 1, noise: float = 0.0, known: bool = True, **params) -> list[float]:
    xs, ys, mean, std = digits
    torch.manual_seed(seed)
    model = SmallCNN(1, 8, 10).eval()
    idx = torch.randperm(len(xs))[:batch]
    x, y = xs[idx], ys[idx]
    update = compute_update(model, x, y)
    if noise:
        update = update.replace([t + noise * torch.randn_like(t) for t in update.tensors], noise_std=noise)
    rec = Geiping(**params).reconstruct(update, model, _knowledge(mean, std, y if known else None))
    assert rec.inputs.shape == x.shape
    return _psnr(rec.inputs, x, mean, std)


# ----------------------------------------------------------------------------- matching loss, TV


def _grads(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, generator=g), torch.randn(5, generator=g)]


def test_matching_loss_zero_for_identical_and_scale_invariant() -> None:
    g = _grads()
    assert float(gradient_matching_loss(g, g)) == pytest.approx(0.0, abs=1e-6)
    assert float(gradient_matching_loss([3.0 * t for t in g], g)) == pytest.approx(0.0, abs=1e-6)
    assert float(gradient_matching_loss([-t for t in g], g)) == pytest.approx(2.0, abs=1e-6)
    other = _grads(1)
    assert float(gradient_matching_loss([5.0 * t for t in other], g)) == pytest.approx(
        float(gradient_matching_loss(other, g)), abs=1e-6
    )


def test_matching_loss_is_one_global_cosine() -> None:
    g, p = _grads(0), _grads(1)
    flat_g, flat_p = torch.cat([t.flatten() for t in g]), torch.cat([t.flatten() for t in p])
    expected = 1 - torch.nn.functional.cosine_similarity(flat_p, flat_g, dim=0)
    assert float(gradient_matching_loss(p, g)) == pytest.approx(float(expected), abs=1e-6)


def test_masked_matching_ignores_masked_coordinates() -> None:
    g = _grads()
    masks = [torch.bernoulli(torch.full_like(t, 0.5), generator=torch.Generator().manual_seed(3)) for t in g]
    masks[1][0] = 0.0
    pred = [t + 100.0 * (1 - m) * torch.randn_like(t) for t, m in zip(g, masks)]  # differs only where masked
    assert float(gradient_matching_loss(pred, g, masks=masks)) == pytest.approx(0.0, abs=1e-6)
    assert float(gradient_matching_loss(pred, g)) > 0.1
    assert float(gradient_matching_loss(pred, g, masks=[None, masks[1]])) > 0.1


def test_l2_cost() -> None:
    g, p = _grads(0), _grads(1)
    expected = sum(((a - b) ** 2).sum() for a, b in zip(p, g))
    assert float(gradient_matching_loss(p, g, cost="l2")) == pytest.approx(float(expected))
    assert float(gradient_matching_loss(g, g, cost="l2")) == 0.0


def test_total_variation_hand_case() -> None:
    x = torch.tensor([[[[0.0, 1.0], [2.0, 4.0]]]])
    # horizontal diffs |1-0|, |4-2| -> mean 1.5; vertical |2-0|, |4-1| -> mean 2.5
    assert float(total_variation(x)) == pytest.approx(4.0)
    assert float(total_variation(torch.ones(2, 3, 5, 5))) == 0.0


def test_multistep_schedule_milestones() -> None:
    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = multistep_schedule(opt, 80)
    assert sorted(sched.milestones) == [30, 50, 70]
    lrs = []
    for _ in range(80):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[29] == pytest.approx(0.1) and lrs[30] == pytest.approx(0.01)
    assert lrs[70] == pytest.approx(1e-4)


# ----------------------------------------------------------------------------- candidate updates


def test_parameter_gradients_and_unrolled_delta_match_the_client(digits) -> None:
    xs, ys, _, _ = digits
    torch.manual_seed(0)
    model = SmallCNN(1, 8, 10).eval()
    x, y = xs[:3], ys[:3]
    honest = compute_update(model, x, y)
    for a, b in zip(parameter_gradients(model, x, y, create_graph=False), honest.tensors):
        torch.testing.assert_close(a, b)
    delta = weight_delta(model, x, y, local_steps=3, lr=0.1)
    for a, b in zip(simulate_delta(model, x, y, local_steps=3, lr=0.1), delta):
        torch.testing.assert_close(a.detach(), b, atol=1e-6, rtol=1e-4)
    assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------- labels, batch size


def test_idlg_recovers_single_labels_exactly(digits) -> None:
    xs, ys, _, _ = digits
    for seed in range(10):
        torch.manual_seed(seed)
        model = SmallCNN(1, 8, 10).eval()
        i = int(torch.randint(len(xs), ()))
        for kind in ("gradient", "delta"):
            update = compute_update(model, xs[i : i + 1], ys[i : i + 1], RoundSettings(kind=kind, local_steps=2))
            assert recover_labels(update, model, 1, 10).tolist() == [int(ys[i])]
            assert estimate_batch_size(update, model, 10) == 1


def test_batch_label_recovery_distinct_labels(digits) -> None:
    xs, ys, _, _ = digits
    for seed in range(5):
        torch.manual_seed(seed)
        model = SmallCNN(1, 8, 10).eval()
        classes = torch.randperm(10)[:4]
        idx = torch.stack([torch.nonzero(ys == c)[seed, 0] for c in classes])
        update = compute_update(model, xs[idx], ys[idx])
        assert recover_labels(update, model, 4, 10).tolist() == sorted(classes.tolist())
        assert recover_labels(update, None, 4, 10).tolist() == sorted(classes.tolist())  # found by shape
        assert estimate_batch_size(update, model, 10) == 4


def test_batch_label_recovery_repeated_label(digits) -> None:
    xs, ys, _, _ = digits
    torch.manual_seed(0)
    model = SmallCNN(1, 8, 10).eval()
    idx = torch.cat([torch.nonzero(ys == 3)[:2, 0], torch.nonzero(ys == 7)[:1, 0], torch.nonzero(ys == 1)[:1, 0]])
    update = compute_update(model, xs[idx], ys[idx])
    assert recover_labels(update, model, 4, 10).tolist() == [1, 3, 3, 7]


# ----------------------------------------------------------------------------- the attack


def test_geiping_quality_on_digits(digits) -> None:
    """Project requirement: SmallCNN, no defense, B = 1, median PSNR over 10 seeds ≥ 30 dB."""
    psnrs = [_trial(digits, seed)[0] for seed in range(10)]
    assert statistics.median(psnrs) >= 30.0, psnrs


def test_geiping_degrades_with_gradient_noise(digits) -> None:
    medians = []
    for noise in (0.0, 1e-2, 1e-1):
        medians.append(statistics.median(_trial(digits, seed, noise=noise, iterations=200)[0] for seed in range(5)))
    assert medians[0] > medians[1] + 5 > medians[2] + 10, medians
    assert medians[2] < 20, medians


def test_geiping_unknown_labels_batch_and_delta(digits) -> None:
    xs, ys, mean, std = digits
    torch.manual_seed(4)
    model = SmallCNN(1, 8, 10).eval()
    idx = torch.stack([torch.nonzero(ys == c)[0, 0] for c in (2, 5)])
    update = compute_update(model, xs[idx], ys[idx], RoundSettings(kind="delta", local_steps=2, lr=0.1))
    rec = Geiping(iterations=150).reconstruct(update, model, _knowledge(mean, std))
    assert rec.labels.tolist() == [2, 5] and rec.inputs.shape == (2, 1, 8, 8)
    assert rec.info["batch_size"] == 2 and rec.info["labels_known"] is False
    assert min(_psnr(rec.inputs, xs[idx], mean, std)) > 25


def test_geiping_box_determinism_and_info(digits) -> None:
    xs, ys, mean, std = digits
    torch.manual_seed(1)
    model = SmallCNN(1, 8, 10).eval()
    update = compute_update(model, xs[:1], ys[:1])
    know = _knowledge(mean, std, ys[:1])
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(Geiping(iterations=20, restarts=2).reconstruct(update, model, know))
    torch.testing.assert_close(runs[0].inputs, runs[1].inputs)
    lo, hi = know.box
    assert bool(((runs[0].inputs >= lo - 1e-6) & (runs[0].inputs <= hi + 1e-6)).all())
    assert set(runs[0].info) >= {"loss", "iterations", "restarts"} and runs[0].info["restarts"] == 2
    assert model.training is False


def test_geiping_masks_pruned_updates(digits) -> None:
    xs, ys, mean, std = digits
    torch.manual_seed(2)
    model = SmallCNN(1, 8, 10).eval()
    update = compute_update(model, xs[:1], ys[:1])
    pruned = []
    for t in update.tensors:  # keep the 20% largest entries of each tensor
        keep = max(1, t.numel() // 5)
        thr = t.abs().flatten().kthvalue(t.numel() - keep + 1).values
        pruned.append(torch.where(t.abs() >= thr, t, torch.zeros_like(t)))
    update = update.replace(pruned, masks=[(t != 0).to(t.dtype) for t in pruned], prune_ratio=0.8)
    know = _knowledge(mean, std, ys[:1])
    torch.manual_seed(0)
    masked = Geiping(iterations=200).reconstruct(update, model, know)
    torch.manual_seed(0)
    plain = Geiping(iterations=200, masked="never").reconstruct(update, model, know)
    assert masked.info["masked"] and not plain.info["masked"]
    assert _psnr(masked.inputs, xs[:1], mean, std)[0] > _psnr(plain.inputs, xs[:1], mean, std)[0] + 10


def test_geiping_masks_follow_the_declared_masks(digits) -> None:
    """``auto`` masks exactly what the defense declared; ``always`` also masks undeclared zeros."""
    xs, ys, mean, std = digits
    torch.manual_seed(0)
    model = SmallCNN(1, 8, 10).eval()
    update = compute_update(model, xs[:1], ys[:1])
    zeroed = update.replace([torch.where(t.abs() > t.abs().median(), t, torch.zeros_like(t)) for t in update.tensors])
    know = _knowledge(mean, std, ys[:1])

    def masked(mode: str, u: SharedUpdate) -> bool:
        return Geiping(iterations=1, masked=mode).reconstruct(u, model, know).info["masked"]

    assert not masked("auto", zeroed) and masked("always", zeroed) and not masked("never", zeroed)
    declared = zeroed.replace(zeroed.tensors, masks=[None] * (len(zeroed.tensors) - 1) + [torch.ones(10)])
    assert masked("auto", declared) and masked("always", declared) and not masked("never", declared)


def test_geiping_tabular_has_no_box() -> None:
    torch.manual_seed(0)
    model = MLP(6, 3, (32,)).eval()
    x, y = 3 * torch.randn(1, 6), torch.tensor([2])
    update = compute_update(model, x, y)
    know = Knowledge(space=InputSpace("tabular", (6,), 3, torch.zeros(6), torch.ones(6)))
    rec = Geiping(iterations=200).reconstruct(update, model, know)
    assert rec.labels.tolist() == [2]
    assert float((rec.inputs - x).abs().max()) < 1e-2


def test_geiping_is_registered_by_the_builtin_plugin() -> None:
    from defenda.plugins import load_plugins

    entry = load_plugins().registry.get("attack", "geiping")
    assert entry.cls is Geiping
    assert Geiping.requires.updates == frozenset({"gradient", "delta"})


def test_shared_update_without_model_names() -> None:
    bias = torch.tensor([0.1, -0.9, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    update = SharedUpdate(tensors=[torch.randn(10, 4), bias], names=["fc.weight", "fc.bias"])
    assert estimate_batch_size(update, None, 10) == 1


def test_stacked_restarts_follow_their_sequential_runs(digits) -> None:
    """Restarts run as one vmapped optimisation; each follows the run a single restart from the same
    start would take, and the lowest final objective wins (as in the sequential loop)."""
    xs, ys, mean, std = digits
    torch.manual_seed(0)
    model = SmallCNN(1, 8, 10).eval()
    update = compute_update(model, xs[:2], ys[:2])
    know = _knowledge(mean, std, ys[:2])
    singles = []
    for k in range(3):  # restart k starts from the k-th draw after the seed
        torch.manual_seed(5)
        for _ in range(k):
            torch.randn(2, 1, 8, 8)
        singles.append(Geiping(iterations=60).reconstruct(update, model, know))
    torch.manual_seed(5)
    stacked = Geiping(iterations=60, restarts=3).reconstruct(update, model, know)
    best = min(singles, key=lambda r: r.info["loss"])
    torch.testing.assert_close(stacked.inputs, best.inputs, atol=1e-5, rtol=1e-4)
    assert stacked.info["loss"] == pytest.approx(best.info["loss"], rel=1e-4, abs=1e-7)
    assert stacked.info["restarts"] == 3


def test_stacked_restarts_unrolled_delta(digits) -> None:
    """The functional (vmappable) FedAvg unroll matches the autograd one."""
    from defenda.inversion import functional_update, predicted_update

    xs, ys, _, _ = digits
    torch.manual_seed(0)
    model = SmallCNN(1, 8, 10).eval()
    update = compute_update(model, xs[:3], ys[:3], RoundSettings(kind="delta", local_steps=3, lr=0.1))
    a = predicted_update(model, xs[:3], ys[:3], update, lr=0.1)
    b = functional_update(model, ys[:3], update, lr=0.1)(xs[:3])
    for u, v in zip(a, b):
        torch.testing.assert_close(u.detach(), v.detach(), atol=1e-6, rtol=1e-4)
