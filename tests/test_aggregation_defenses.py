"""Server-side defenses of a federation: secure aggregation (exact, and Flower's SecAgg+ encoding with
masks that cancel bit for bit), client-level DP-FedAvg (clipping, noise scales, equal weights), their
composition, and DP-SGD's sample-level ledger entries and FedAvg epochs (reference federation.md §4, §5, §7)."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from defenda import FederationPlan, RoundSettings, SharedUpdate
from defenda.compose import make_defense
from defenda.errors import ParamError
from defenda.federation.aggregation import weighted_sum
from defenda.federation.client import compute_update
from defenda_defenses.dp_fedavg import DPFedAvg, update_norm
from defenda_defenses.dp_sgd import DPSGD
from defenda_defenses.noise import GaussianNoise, LaplaceNoise
from defenda_defenses.secure_aggregation import (
    SecureAggregation,
    mask_vectors,
    quantize,
    secure_sum,
    stochastic_round,
    unmask_sum,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def updates(k: int, shapes: tuple[tuple[int, ...], ...] = ((30, 20), (7,)), *, scale: float = 1e-2,
            sizes: list[int] | None = None, seed: int = 0, dtype: torch.dtype = torch.float64) -> list[SharedUpdate]:
    g = gen(seed)
    sizes = sizes or [10] * k
    return [SharedUpdate(tensors=[scale * torch.randn(s, generator=g, dtype=dtype) for s in shapes],
                         names=[f"p{i}" for i in range(len(shapes))], kind="delta", batch_size=n) for n in sizes]


def flat(u: SharedUpdate) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in u.tensors])


def plan(k: int, sampling: str = "uniform") -> FederationPlan:
    return FederationPlan(clients=10 * k, clients_per_round=k, rounds=5, sampling=sampling)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))


def tiny_data(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = gen(seed)
    return torch.randn(n, 12, generator=g), torch.randint(0, 3, (n,), generator=g)


# ------------------------------------------------------------------ secure aggregation: exact


def test_exact_secure_aggregate_is_the_weighted_sum() -> None:
    ups = updates(4, sizes=[5, 10, 20, 45])
    p = [n / 80 for n in (5, 10, 20, 45)]
    sa = SecureAggregation()
    assert sa.hides_client_updates and sa.params.quantization_range == 0
    out = sa.secure_aggregate(ups, p, gen(0))
    for i, t in enumerate(out.tensors):
        expected = sum(w * u.tensors[i] for u, w in zip(ups, p))
        assert torch.allclose(t, expected, rtol=0, atol=1e-15)
    assert out.batch_size == 80
    info = out.meta["secure_aggregation"]
    assert info["clients"] == 4 and info["quantization_range"] == 0 and info["exact"]
    assert out.meta["aggregated_clients"] == 4


def test_secure_aggregation_leaves_each_client_update_alone() -> None:
    sa = SecureAggregation(quantization_range=2**16)
    up = updates(1)[0]
    out = sa.client_update(tiny_model(), *tiny_data(4), RoundSettings(), gen(0))
    honest = compute_update(tiny_model(), *tiny_data(4), RoundSettings())
    assert all(torch.equal(a, b) for a, b in zip(out.tensors, honest.tensors))
    assert sa.transform(up, gen(0)) is up
    assert sa.noise_position() is None and sa.client_noise_multiplier() is None
    assert sa.sample_ledger_entry(RoundSettings(), 4) is None


# ------------------------------------------------------------------ secure aggregation: Flower's encoding


def test_pairwise_and_self_masks_cancel_bit_for_bit() -> None:
    sa = SecureAggregation(quantization_range=2**22)
    ups = updates(5, sizes=[8, 8, 16, 32, 64])
    p = [n / 128 for n in (8, 8, 16, 32, 64)]
    vectors, _ = sa.encode(ups, p, gen(3))
    m = sa.params.modulus_range
    masked, self_masks = mask_vectors(vectors, m, gen(4))
    for v, mv in zip(vectors, masked):
        assert mv.dtype == torch.int64 and bool(((mv >= 0) & (mv < m)).all())
        assert (mv != v).float().mean() > 0.99  # each masked vector hides the client's integers
    plain = torch.stack(vectors).sum(0) % m
    assert torch.equal(unmask_sum(masked, self_masks, m), plain)
    assert torch.equal(secure_sum(vectors, m, gen(5)), plain)
    # without removing the self-masks the sum is garbage: the self-masks really were added
    assert not torch.equal(unmask_sum(masked, torch.zeros_like(self_masks), m), plain)


def test_masks_cancel_for_wrapping_values_and_a_large_modulus() -> None:
    for m in (2**8, 2**32, 2**62):
        g = gen(m % 97)
        vectors = [torch.randint(0, m, (500,), generator=g, dtype=torch.int64) for _ in range(6)]
        plain = torch.zeros(500, dtype=torch.int64)
        for v in vectors:
            plain = (plain + v) % m
        assert torch.equal(secure_sum(vectors, m, gen(1)), plain)


def test_stochastic_rounding_is_flowers_rule() -> None:
    v = torch.tensor([2.0, 2.25, 2.75, -0.5], dtype=torch.float64)
    rounded = torch.stack([stochastic_round(v, gen(s)) for s in range(4000)]).double()
    assert set(rounded[:, 0].tolist()) == {2.0}  # integers stay put
    assert bool(((rounded[:, 1:] - torch.floor(v[1:])).abs() <= 1).all())
    assert torch.allclose(rounded.mean(0), v, atol=0.03)  # unbiased
    q, clipped = quantize(torch.tensor([-9.0, 0.0, 9.0]), 8.0, 16, gen(0))
    assert q.tolist() == [0, 8, 16] and clipped == 2


def test_decoded_average_is_within_the_deterministic_bound() -> None:
    q, c, k = 2**12, 8.0, 5
    sizes = [8, 16, 24, 40, 72]
    ups = updates(k, sizes=sizes, scale=0.5)
    p = [n / sum(sizes) for n in sizes]
    sa = SecureAggregation(quantization_range=q, clipping_range=c)
    _, enc = sa.encode(ups, p, gen(0))
    dq = [qr / q for qr in enc["q_ratios"]]
    ratios = [n / 1000.0 for n in sizes]  # Flower's n_k / max_weight
    assert enc["ratios"] == pytest.approx(ratios)
    assert all(abs(d - r) <= 1 / (2 * q) + 1e-15 for d, r in zip(dq, ratios))
    dq_mean = sum(d * flat(u) for d, u in zip(dq, ups)) / sum(dq)
    bound = 2 * k * c / (q * sum(dq))
    for seed in range(5):
        out = sa.secure_aggregate(ups, p, gen(seed))
        err = (flat(out) - dq_mean).abs()
        assert float(err.max()) <= bound * (1 + 1e-9)
        assert float(err.max()) > 0  # the encoding is really lossy
        assert out.meta["secure_aggregation"]["total_quantized_weight"] == sum(enc["q_ratios"])
        assert out.batch_size == sum(sizes)
    # the p-weighted sum differs from the dq-weighted mean only through the weight rounding
    exact = flat(weighted_sum(ups, p))
    rounding = sum(abs(d / sum(dq) - w) * float(flat(u).abs().max()) for d, w, u in zip(dq, p, ups))
    assert 0 < rounding < 1e-2
    assert float((flat(out) - exact).abs().max()) <= bound + rounding


def test_decoded_average_is_unbiased_over_seeds() -> None:
    q, c, k = 256, 1.0, 4
    ups = updates(k, shapes=((1000,),), scale=0.3)
    p = [0.25] * k
    sa = SecureAggregation(quantization_range=q, clipping_range=c, max_weight=0.0)  # quantize p_k: dq = 0.25
    exact = flat(weighted_sum(ups, p))
    errors = torch.stack([flat(sa.secure_aggregate(ups, p, gen(s))) - exact for s in range(400)])
    single = float(errors.abs().max())
    assert 1e-3 < single <= 2 * k * c / q + 1e-12
    assert float(errors.mean(0).abs().max()) < 2.5e-3  # per coordinate; a biased rounding would be ~1.6e-2
    assert abs(float(errors.mean())) < 1e-4


def test_encoding_uses_the_generator_deterministically() -> None:
    sa = SecureAggregation(quantization_range=2**10)
    ups, p = updates(3), [1 / 3] * 3
    a, b = sa.secure_aggregate(ups, p, gen(7)), sa.secure_aggregate(ups, p, gen(7))
    assert all(torch.equal(s, t) for s, t in zip(a.tensors, b.tensors))
    c = sa.secure_aggregate(ups, p, gen(8))
    assert not all(torch.equal(s, t) for s, t in zip(a.tensors, c.tensors))
    assert [t.dtype for t in a.tensors] == [t.dtype for t in ups[0].tensors]


def test_overflow_of_the_modulus_raises() -> None:
    sa = SecureAggregation(quantization_range=2**8, modulus_range=2**10)
    sa.secure_aggregate(updates(3), [1 / 3] * 3, gen(0))  # 3·256 < 1024
    with pytest.raises(ValueError, match="overflow"):
        sa.secure_aggregate(updates(4), [0.25] * 4, gen(0))  # 4·256 = 1024
    with pytest.raises(ValueError, match="overflow"):  # Flower's defaults: K < 1024
        SecureAggregation(quantization_range=2**22).encode(updates(1024, shapes=((2,),)), [1 / 1024] * 1024)


def test_weights_that_round_to_zero_and_bad_params_raise() -> None:
    with pytest.raises(ValueError, match="rounds to 0"):
        SecureAggregation(quantization_range=16).secure_aggregate(updates(2, sizes=[1, 1]), [0.5, 0.5], gen(0))
    for bad in ({"modulus_range": 1000}, {"quantization_range": 2**32}, {"quantization_range": -1},
                {"clipping_range": 0.0}, {"max_weight": -1.0}):
        with pytest.raises(ParamError):
            SecureAggregation(**bad)


def test_clipping_of_large_weighted_entries_warns() -> None:
    ups = updates(2, scale=100.0, sizes=[500, 500])
    with pytest.warns(RuntimeWarning, match="clipped"):
        out = SecureAggregation(quantization_range=2**16).secure_aggregate(ups, [0.5, 0.5], gen(0))
    assert out.meta["secure_aggregation"]["clipped_entries"] > 0


# ------------------------------------------------------------------ DP-FedAvg


def test_dp_fedavg_clips_the_whole_update() -> None:
    d = DPFedAvg(clip_norm=0.5, noise_multiplier=1.0)
    big = updates(1, scale=1.0, dtype=torch.float32)[0]
    assert update_norm(big.tensors) > 0.5
    out = d.transform(big, gen(0))
    assert update_norm(out.tensors) <= 0.5 * (1 + 1e-6)
    assert update_norm(out.tensors) == pytest.approx(0.5, rel=1e-5)
    small = updates(1, scale=1e-4)[0]
    assert all(torch.equal(a, b) for a, b in zip(d.transform(small, gen(0)).tensors, small.tensors))
    assert out.meta["clip_norm"] == 0.5 and out.meta["noise_multiplier"] == 1.0
    assert out.meta["dp_level"] == "client" and out.meta["mode"] == "central"
    # FedSGD: the gradient is the update and is clipped too
    grad = d.client_update(tiny_model(), *tiny_data(8), RoundSettings("gradient", lr=1.0), gen(0))
    honest = compute_update(tiny_model(), *tiny_data(8), RoundSettings("gradient", lr=1.0))
    assert update_norm(grad.tensors) <= min(0.5, update_norm(honest.tensors)) * (1 + 1e-6)


def zeros(n: int = 100_000) -> SharedUpdate:
    return SharedUpdate(tensors=[torch.zeros(n - 1000, dtype=torch.float64), torch.zeros(10, 100, dtype=torch.float64)],
                        names=["w", "b"], kind="delta")


def test_central_server_noise_has_std_z_s_over_k() -> None:
    z, s, k = 1.5, 2.0, 10
    d = DPFedAvg(noise_multiplier=z, clip_norm=s)
    d.join_federation(plan(k))
    agg = weighted_sum([d.transform(zeros(), gen(i)) for i in range(k)], d.aggregation_weights([50] * k))
    assert all(float(t.abs().max()) == 0 for t in agg.tensors)  # central: clients add nothing
    out = d.server_update(agg, clients=k, generator=gen(1))
    noise = flat(out)
    assert float(noise.std()) == pytest.approx(z * s / k, rel=0.02)
    assert abs(float(noise.mean())) < 5 * z * s / k / math.sqrt(noise.numel())
    assert out.meta["server_noise_std"] == pytest.approx(z * s / k) and out.meta["noise_denominator"] == k


def test_central_noise_uses_the_fixed_denominator() -> None:
    d = DPFedAvg(noise_multiplier=1.0, clip_norm=1.0)
    d.join_federation(plan(10, sampling="poisson"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a Poisson round of another size is expected, not warned about
        out = d.server_update(zeros(), clients=7, generator=gen(0))
    assert float(flat(out).std()) == pytest.approx(0.1, rel=0.02)
    assert d.aggregation_weights([3, 30, 300]) == [0.1, 0.1, 0.1]  # 1/K, not 1/3
    uniform = DPFedAvg()
    uniform.join_federation(plan(10))
    with pytest.warns(RuntimeWarning, match="configured 10"):  # a uniform round lost clients
        uniform.server_update(zeros(2000), clients=9, generator=gen(0))


def test_distributed_noise_sums_to_z_s_and_the_server_adds_none() -> None:
    z, s, k = 1.2, 0.5, 8
    d = DPFedAvg(noise_multiplier=z, clip_norm=s, mode="distributed")
    d.join_federation(plan(k))
    shares = [d.transform(zeros(), gen(i)) for i in range(k)]
    assert float(flat(shares[0]).std()) == pytest.approx(z * s / math.sqrt(k), rel=0.02)
    total = sum(flat(u) for u in shares)
    assert float(total.std()) == pytest.approx(z * s, rel=0.02)
    mean = weighted_sum(shares, d.aggregation_weights([1] * k))
    out = d.server_update(mean, clients=k, generator=gen(99))
    assert all(torch.equal(a, b) for a, b in zip(out.tensors, mean.tensors))
    assert float(flat(out).std()) == pytest.approx(z * s / k, rel=0.02)  # the same noise on the mean as central
    assert shares[0].meta["client_noise_std"] == pytest.approx(z * s / math.sqrt(k))


def test_dp_fedavg_weights_multiplier_and_positions() -> None:
    d = DPFedAvg(noise_multiplier=0.7)
    assert d.aggregation_weights([5, 50, 500]) == pytest.approx([1 / 3] * 3)  # outside a federation
    d.join_federation(plan(3))
    assert d.aggregation_weights([5, 50, 500]) == pytest.approx([1 / 3] * 3)
    assert d.client_noise_multiplier() == 0.7
    assert d.noise_position() == "after"
    assert DPFedAvg(mode="distributed").noise_position() == "before"
    assert DPFedAvg(noise_multiplier=0.0).noise_position() is None
    assert not d.hides_client_updates and d.sample_ledger_entry(RoundSettings(), 8) is None
    assert d.transform(zeros(2000), gen(0)).meta["clients_per_round"] == 3
    for bad in ({"noise_multiplier": -1.0}, {"clip_norm": 0.0}, {"mode": "local"}):
        with pytest.raises(ParamError):
            DPFedAvg(**bad)


def test_other_noise_defenses_noise_before_the_server_observes() -> None:
    assert GaussianNoise(std=0.1).noise_position() == "before"
    assert LaplaceNoise(scale=0.1).noise_position() == "before"
    assert GaussianNoise().noise_position() is None


# ------------------------------------------------------------------ composition


@pytest.mark.parametrize("name", ["dp-fedavg+secure-aggregation", "secure-aggregation+dp-fedavg"])
def test_dp_fedavg_composes_with_secure_aggregation(name: str) -> None:
    from defenda.plugins import get_plugins

    registry = get_plugins().registry
    params = {"dp-fedavg": {"noise_multiplier": 1.0, "clip_norm": 0.05, "mode": "distributed"},
              "secure-aggregation": {"quantization_range": 2**22}}
    d = make_defense(registry, name, params)
    assert d.hides_client_updates
    d.join_federation(plan(4))
    model = tiny_model()
    ups = [d.client_update(model, *tiny_data(10, seed=s), RoundSettings("delta", lr=1.0), gen(s)) for s in range(4)]
    honest = compute_update(model, *tiny_data(10, seed=0), RoundSettings("delta", lr=1.0))
    assert update_norm(honest.tensors) > 0.05
    assert ups[0].meta["dp_level"] == "client" and ups[0].meta["client_noise_std"] == pytest.approx(0.025)
    p = d.aggregation_weights([10, 20, 30, 40])
    assert p == pytest.approx([0.25] * 4)
    agg = d.secure_aggregate(ups, p, gen(9))
    assert agg.meta["secure_aggregation"]["clients"] == 4 and agg.batch_size == 40
    assert d.server_update(agg, clients=4, generator=gen(0)) is agg  # distributed: nothing at the server
    assert d.noise_position() == "before" and d.client_noise_multiplier() == 1.0
    # without the client noise, the clipping alone is visible: each update has norm <= S
    clip_only = make_defense(registry, name, {**params, "dp-fedavg": {"noise_multiplier": 0.0, "clip_norm": 0.05}})
    clipped = clip_only.client_update(model, *tiny_data(10), RoundSettings("delta", lr=1.0), gen(0))
    assert update_norm(clipped.tensors) <= 0.05 * (1 + 1e-6)


def test_central_dp_fedavg_under_secure_aggregation_noises_the_decoded_mean() -> None:
    from defenda.plugins import get_plugins

    d = make_defense(get_plugins().registry, "dp-fedavg+secure-aggregation",
                     {"dp-fedavg": {"noise_multiplier": 2.0, "clip_norm": 1.0}, "secure-aggregation": {}})
    d.join_federation(plan(5))
    agg = d.secure_aggregate([zeros() for _ in range(5)], d.aggregation_weights([1] * 5), gen(0))
    out = d.server_update(agg, clients=5, generator=gen(1))
    assert float(flat(out).std()) == pytest.approx(2.0 / 5, rel=0.02)
    assert d.noise_position() == "after"


# ------------------------------------------------------------------ DP-SGD in a federation


def test_dp_sgd_sample_ledger_entries() -> None:
    d = DPSGD(noise_multiplier=1.2, accountant="prv")
    assert d.sample_ledger_entry(RoundSettings("gradient", client_samples=100), 10) == (1.2, 0.1, 1)
    assert d.sample_ledger_entry(RoundSettings("gradient"), 10) == (1.2, 1.0, 1)
    sigma, q, steps = d.sample_ledger_entry(RoundSettings("delta", local_steps=4, client_samples=40), 8)
    assert (sigma, q, steps) == (pytest.approx(0.6), pytest.approx(0.2), 1)
    epochs = RoundSettings("delta", local_epochs=2, local_batch_size=16, client_samples=50)
    # Opacus' Poisson rate 1/⌈50/16⌉ = 0.25 (not b/n = 0.32), int(1/q) = 4 batches per epoch, E = 2
    assert d.sample_ledger_entry(epochs, 50) == (1.2, 0.25, 8)
    no_n = RoundSettings("delta", local_epochs=3, local_batch_size=5)
    assert d.sample_ledger_entry(no_n, 20) == (1.2, pytest.approx(0.25), 12)
    assert d.ledger_accountant() == "prv" and DPSGD().ledger_accountant() == "rdp"
    assert d.noise_position() == "before" and DPSGD(noise_multiplier=0.0).noise_position() is None


def test_dp_sgd_runs_the_federations_minibatch_epochs() -> None:
    n, b, e = 20, 6, 2
    x, y = tiny_data(n)
    settings = RoundSettings("delta", lr=0.5, local_epochs=e, local_batch_size=b, order_seed=3, client_samples=n)
    d = DPSGD(noise_multiplier=0.5, max_grad_norm=1.0)
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    up = d.client_update(model, x, y, settings, gen(0))
    assert up.local_steps == e * math.ceil(n / b) == 8
    assert (up.local_epochs, up.local_batch_size, up.batch_size) == (e, b, n)
    # Opacus divides by the expected Poisson batch int(n·q) = int(20/4) = 5
    assert up.meta["dp_steps"] == 8 and up.meta["noise_std"] == pytest.approx(0.5 / 5)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    again = d.client_update(model, x, y, settings, gen(0))
    assert all(torch.equal(s, t) for s, t in zip(up.tensors, again.tensors))


def test_dp_sgd_epochs_without_noise_are_sgd_on_opacus_poisson_batches() -> None:
    """σ = 0 and no effective clipping: DP-SGD's epochs are plain SGD on the Poisson batches Opacus'
    sampler draws from the client's data, each loss summed and divided by the expected batch size."""
    from torch.nn import functional as F

    from defenda_defenses.dp_sgd import _poisson_batches

    n, b = 18, 6
    x, y = tiny_data(n)
    settings = RoundSettings("delta", lr=0.5, local_epochs=2, local_batch_size=b, order_seed=11)
    model = tiny_model()
    dp = DPSGD(noise_multiplier=0.0, max_grad_norm=1e6).client_update(model, x, y, settings, gen(0))
    batches, divisor = _poisson_batches(x, y, settings)
    assert dp.local_steps == len(batches) == 6 and divisor == 6
    local = copy.deepcopy(model)
    opt = torch.optim.SGD(local.parameters(), lr=0.5)
    for bx, by in batches:
        opt.zero_grad()
        if len(bx):
            (F.cross_entropy(local(bx), by, reduction="sum") / divisor).backward()
            opt.step()
    for a, p, q in zip(dp.tensors, local.parameters(), model.parameters()):
        assert torch.allclose(a, p.detach() - q.detach(), atol=1e-6, rtol=1e-4)
    other = _poisson_batches(x, y, RoundSettings("delta", lr=0.5, local_epochs=2, local_batch_size=b, order_seed=12))
    assert [len(bx) for bx, _ in other[0]] != [len(bx) for bx, _ in batches] or not all(
        torch.equal(a[0], c[0]) for a, c in zip(batches, other[0]))


def test_dp_sgd_full_batch_local_steps_are_unchanged() -> None:
    x, y = tiny_data(8)
    d = DPSGD(noise_multiplier=0.3)
    up = d.client_update(tiny_model(), x, y, RoundSettings("delta", local_steps=3), gen(0))
    assert up.local_steps == 3 and up.local_epochs == 0 and up.meta["noise_std"] == pytest.approx(0.3 / 8)
    assert d._steps_per_round == 3
