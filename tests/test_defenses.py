"""The built-in defenses do what they claim: exact top-k pruning, ≤ 2^k quantization levels,
calibrated noise, DP-SGD equal to Opacus' own result, ε equal to Opacus' accountant, the
caller's model untouched, determinism under a seeded generator, and the large-batch size."""

from __future__ import annotations

import copy
import math
import re
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from defenda import RoundSettings, SharedUpdate
from defenda.errors import ParamError
from defenda.federation.client import compute_update
from defenda.models import SmallCNN
from defenda.params import strength_param
from defenda_defenses.batch import LargeBatch
from defenda_defenses.dp_sgd import DPSGD
from defenda_defenses.noise import GaussianNoise, LaplaceNoise, clip_update
from defenda_defenses.prune import Prune, kept_count
from defenda_defenses.quantize import Quantize

ALL = (DPSGD, GaussianNoise, LaplaceNoise, Prune, Quantize, LargeBatch)
DELTA = 1e-5
SGD = RoundSettings()  # a FedSGD gradient at lr 0.1


def utility_job(defense: str, params: dict, *, client_batch_size: int, rounds: int, delta: float = 0.0):  # noqa: ANN201
    """A utility-training job on the embedded digits (FedSGD, lr 0.1)."""
    from defenda.harness.jobs import Federation, UtilityJob

    fed = Federation(rounds=rounds, client_batch_size=client_batch_size, lr=0.1, update="gradient", local_steps=1,
                     delta=delta)
    return UtilityJob(key="", task="digits", task_params={}, defense=defense, defense_params=params, strength=None,
                      seed=0, federation=fed)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def cnn() -> nn.Module:
    torch.manual_seed(0)
    return SmallCNN(1, 8, 10).train()


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = gen(1)
    return torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)


def bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 8 * 8, 10)).train()


def random_update(shapes: list[tuple[int, ...]], seed: int = 0) -> SharedUpdate:
    g = gen(seed)
    tensors = [torch.randn(s, generator=g) for s in shapes]
    return SharedUpdate(tensors=tensors, names=[f"p{i}" for i in range(len(shapes))])


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "params": [(n, id(p)) for n, p in model.named_parameters()],
        "hooks": [(n, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
                   len(getattr(m, "_backward_pre_hooks", {}))) for n, m in model.named_modules()],
        "types": [(n, type(m)) for n, m in model.named_modules()],
        "training": model.training,
    }


def assert_unchanged(model: nn.Module, snap: dict) -> None:
    now = snapshot(model)
    assert now["params"] == snap["params"] and now["types"] == snap["types"]
    assert now["hooks"] == snap["hooks"], "hooks left attached to the caller's model"
    assert now["training"] == snap["training"]
    for k, v in snap["state"].items():
        assert torch.equal(now["state"][k], v), f"{k} was modified"
    for p in model.parameters():
        assert p.grad is None
        assert not hasattr(p, "grad_sample") and not hasattr(p, "summed_grad")


# ------------------------------------------------------------------ declarations


@pytest.mark.parametrize("cls", ALL)
def test_declares_strength_sweep_and_source(cls: type) -> None:
    info = strength_param(cls.Params)
    assert info is not None and info.strength in ("up", "down")
    assert len(cls.default_sweep) >= 4
    for value in cls.default_sweep:
        cls(**{info.name: value})  # every default strength is valid
    text = (cls.__doc__ or "") + (sys.modules[cls.__module__].__doc__ or "")
    assert cls.__doc__ and re.search(r"et al\. (19|20)\d\d", text)  # cites its source


@pytest.mark.parametrize("cls, bad", [
    (GaussianNoise, {"std": -0.1}), (GaussianNoise, {"clip": -1.0}), (LaplaceNoise, {"scale": -1.0}),
    (Prune, {"fraction": 1.0}), (Prune, {"fraction": -0.1}), (Quantize, {"bits": 0}), (Quantize, {"bits": 33}),
    (Quantize, {"rounding": "nearest"}), (LargeBatch, {"batch_size": 0}), (DPSGD, {"noise_multiplier": -1.0}),
    (DPSGD, {"max_grad_norm": 0.0}), (DPSGD, {"target_epsilon": -1.0}), (DPSGD, {"accountant": "gdp"}),
])
def test_out_of_range_values_are_rejected(cls: type, bad: dict) -> None:
    with pytest.raises(ParamError, match=next(iter(bad))):
        cls(**bad)
    with pytest.raises(ValueError):
        cls.Params(**bad)


def test_registered_with_their_names() -> None:
    from defenda.plugins import get_plugins

    names = set(get_plugins().registry.names("defense"))
    assert {"none", "dp-sgd", "gaussian-noise", "laplace-noise", "prune", "quantize", "large-batch"} <= names
    assert strength_param(Quantize.Params).strength == "down"


# ------------------------------------------------------------------ noise


@pytest.mark.parametrize("cls, field, factor", [(GaussianNoise, "std", 1.0), (LaplaceNoise, "scale", math.sqrt(2))])
def test_noise_std_matches_request(cls: type, field: str, factor: float) -> None:
    update = SharedUpdate(tensors=[torch.zeros(300, 400), torch.zeros(1000)], names=["w", "b"])
    out = cls(**{field: 0.05}).transform(update, gen(0))
    noise = torch.cat([t.flatten() for t in out.tensors])
    expected = 0.05 * factor
    assert abs(float(noise.std()) / expected - 1) < 0.05
    assert abs(float(noise.mean())) < 0.01 * expected * 10
    assert out.meta["noise_std"] == pytest.approx(expected) and out.meta["noise_scale"] == 0.05
    if cls is LaplaceNoise:  # heavier tails than a Gaussian of the same std: kurtosis 6 vs 3
        z = noise / noise.std()
        assert float((z**4).mean()) == pytest.approx(6.0, rel=0.1)


@pytest.mark.parametrize("cls, field", [(GaussianNoise, "std"), (LaplaceNoise, "scale")])
def test_noise_clips_whole_update_first(cls: type, field: str) -> None:
    update = random_update([(50, 20), (20,)])
    out = cls(**{field: 0.0, "clip": 0.5}).transform(update, gen(0))
    norm = math.sqrt(sum(float((t**2).sum()) for t in out.tensors))
    assert norm == pytest.approx(0.5, rel=1e-5)
    ratio = out.tensors[0] / update.tensors[0]
    assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio))  # scaled, not reshaped
    assert clip_update(update.tensors, 1e9)[0] is update.tensors[0] or torch.equal(
        clip_update(update.tensors, 1e9)[0], update.tensors[0])


@pytest.mark.parametrize("cls, field", [(GaussianNoise, "std"), (LaplaceNoise, "scale")])
def test_noise_is_deterministic_per_generator(cls: type, field: str) -> None:
    update = random_update([(30, 30)])
    d = cls(**{field: 0.1})
    a, b, c = (d.transform(update, gen(s)).tensors[0] for s in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ------------------------------------------------------------------ prune


@pytest.mark.parametrize("r", [0.0, 0.3, 0.5, 0.8, 0.9, 0.95, 0.99])
def test_prune_keeps_exactly_top_k_per_layer(r: float) -> None:
    update = random_update([(64, 32), (32,), (10, 3, 3, 3), (10,), (7,)])
    out = Prune(fraction=r).transform(update, None)
    for t, p in zip(update.tensors, out.tensors):
        k = math.floor(round((1 - r) * t.numel(), 6))
        assert p.shape == t.shape
        assert int((p != 0).sum()) == k
        top = set(t.flatten().abs().topk(k).indices.tolist()) if k else set()
        assert set(p.flatten().nonzero().flatten().tolist()) == top
        kept = p != 0
        assert torch.equal(p[kept], t[kept])
    assert out.meta["prune_fraction"] == r
    if r == 0:
        assert out.masks is None  # nothing dropped
    else:  # the kept coordinates are declared, one mask per tensor
        assert out.masks is not None and len(out.masks) == len(out.tensors)
        for p, m in zip(out.tensors, out.masks):
            assert m is not None and m.dtype == p.dtype and torch.equal(m, (p != 0).to(p.dtype))


def test_later_transforms_keep_the_pruned_masks() -> None:
    update = random_update([(8, 4), (4,)])
    pruned = Prune(fraction=0.5).transform(update, None)
    noisy = GaussianNoise(std=0.1).transform(pruned, gen(0))
    assert noisy.masks is pruned.masks
    assert Quantize(bits=4).transform(update, None).masks is None


def test_prune_count_formula() -> None:
    assert kept_count(10, 0.8) == 2  # (1 − 0.8)·10 = 1.9999999999999996 in floats
    assert kept_count(10, 0.95) == 0 and kept_count(100, 0.95) == 5 and kept_count(7, 0.0) == 7


# ------------------------------------------------------------------ quantize


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("rounding", ["deterministic", "stochastic"])
def test_quantize_has_at_most_2_to_the_k_levels(bits: int, rounding: str) -> None:
    update = random_update([(64, 40), (40,), (3,)])
    out = Quantize(bits=bits, rounding=rounding).transform(update, gen(0))
    for t, q in zip(update.tensors, out.tensors):
        assert q.shape == t.shape and q.dtype == t.dtype
        assert q.unique().numel() <= 2**bits
        if bits >= 3 and t.numel() > 100:
            assert q.unique().numel() > 2 ** (bits - 1)  # uses the levels it has
    assert out.meta["quant_bits"] == bits


def test_quantize_deterministic_error_is_half_a_step() -> None:
    update = random_update([(100, 50)])
    t = update.tensors[0]
    for bits in (2, 4, 8):
        q = Quantize(bits=bits).transform(update, None).tensors[0]
        step = float(t.abs().max()) / (2 ** (bits - 1) - 1)
        assert float((q - t).abs().max()) <= step / 2 * (1 + 1e-5)
        assert float(q.abs().max()) == pytest.approx(float(t.abs().max()))
        levels = (q.double() / step).round()
        assert torch.allclose(q.double(), levels * step, atol=1e-6)  # on the symmetric grid


def test_quantize_keeps_zeros_zero() -> None:
    pruned = Prune(fraction=0.9).transform(random_update([(40, 40)]), None)
    for rounding in ("deterministic", "stochastic"):
        q = Quantize(bits=2, rounding=rounding).transform(pruned, gen(0)).tensors[0]
        assert bool((q[pruned.tensors[0] == 0] == 0).all())


def test_quantize_sign_compression() -> None:
    t = torch.tensor([-2.0, -0.5, 0.0, 1.0, 3.0])
    q = Quantize(bits=1).transform(SharedUpdate([t], ["w"]), None).tensors[0]
    s = float(t.abs().mean())
    assert torch.allclose(q, torch.tensor([-s, -s, s, s, s]))


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_quantize_stochastic_is_unbiased_and_seeded(bits: int) -> None:
    update = random_update([(200,)])
    d = Quantize(bits=bits, rounding="stochastic")
    g = gen(0)
    mean = torch.stack([d.transform(update, g).tensors[0] for _ in range(2000)]).mean(0)
    t = update.tensors[0]
    assert float((mean - t).abs().max()) < 0.15 * float(t.abs().max())
    a, b = (d.transform(update, gen(5)).tensors[0] for _ in range(2))
    assert torch.equal(a, b)


# ------------------------------------------------------------------ large batch


def test_large_batch_sets_the_client_batch_size(cnn: nn.Module) -> None:
    d = LargeBatch(batch_size=64)
    assert d.client_batch_size(4) == 64 and d.client_batch_size(128) == 64
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    up = d.client_update(cnn, x, y, SGD)
    honest = compute_update(cnn, x, y)
    assert up.batch_size == 64 and all(torch.equal(a, b) for a, b in zip(up.tensors, honest.tensors))


def test_large_batch_is_used_by_utility_training(monkeypatch: pytest.MonkeyPatch) -> None:
    from defenda.harness.utility import measure_utility
    from defenda.plugins import get_plugins

    seen: list[int] = []
    original = LargeBatch.client_update

    def spy(self, model, x, y, settings, generator=None):  # noqa: ANN001, ANN202
        seen.append(len(x))
        return original(self, model, x, y, settings, generator)

    monkeypatch.setattr(LargeBatch, "client_update", spy)
    job = utility_job("large-batch", {"batch_size": 48}, client_batch_size=8, rounds=2)
    measure_utility(get_plugins(), job, torch.device("cpu"))
    assert seen == [48, 48]


# ------------------------------------------------------------------ DP-SGD


def opacus_reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, sigma: float, clip: float,
                     seed: int, kind: str = "gradient", steps: int = 1, lr: float = 0.1) -> list[torch.Tensor]:
    """The update computed with Opacus' own PrivacyEngine.make_private on a copy of ``model``."""
    from opacus import PrivacyEngine
    from opacus.validators import ModuleValidator
    from torch.utils.data import DataLoader, TensorDataset

    ref = copy.deepcopy(model).train()
    if not ModuleValidator.is_valid(ref):
        ref = ModuleValidator.fix(ref)
        with torch.no_grad():
            for a, b in zip(ref.parameters(), model.parameters()):
                a.copy_(b)
    opt = torch.optim.SGD(ref.parameters(), lr=lr)
    loader = DataLoader(TensorDataset(x, y), batch_size=len(x), shuffle=False)
    engine = PrivacyEngine()
    module, dp_opt, loader = engine.make_private(module=ref, optimizer=opt, data_loader=loader,
                                                 noise_multiplier=sigma, max_grad_norm=clip,
                                                 poisson_sampling=False, noise_generator=gen(seed))
    for _ in range(steps):
        for xb, yb in loader:
            dp_opt.zero_grad()
            F.cross_entropy(module(xb), yb).backward()
            dp_opt.step()
    if kind == "gradient":
        return [p.grad.detach().clone() for p in module.parameters()]
    return [a.detach() - b.detach() for a, b in zip(module.parameters(), model.parameters())]


@pytest.mark.parametrize("sigma, clip", [(0.0, 0.5), (0.7, 1.0), (2.0, 0.1)])
def test_dp_sgd_gradient_equals_opacus(cnn: nn.Module, batch: tuple, sigma: float, clip: float) -> None:
    x, y = batch
    d = DPSGD(noise_multiplier=sigma, max_grad_norm=clip)
    for _ in range(2):  # the second call uses the cached wrapper
        up = d.client_update(cnn, x, y, SGD, generator=gen(7))
        ref = opacus_reference(cnn, x, y, sigma=sigma, clip=clip, seed=7)
        assert up.kind == "gradient" and up.batch_size == len(x)
        assert up.names == [n for n, _ in cnn.named_parameters()]
        for a, b in zip(up.tensors, ref):
            assert torch.equal(a, b)
    assert up.meta["noise_multiplier"] == sigma and up.meta["max_grad_norm"] == clip
    honest = compute_update(cnn, x, y).tensors
    assert not all(torch.allclose(a, b) for a, b in zip(up.tensors, honest))


def test_dp_sgd_without_clipping_or_noise_is_the_honest_gradient(cnn: nn.Module, batch: tuple) -> None:
    x, y = batch
    up = DPSGD(noise_multiplier=0.0, max_grad_norm=1e6).client_update(cnn, x, y, SGD, generator=gen(0))
    for a, b in zip(up.tensors, compute_update(cnn, x, y).tensors):
        assert torch.allclose(a, b, atol=1e-6)


def test_dp_sgd_delta_equals_opacus(cnn: nn.Module, batch: tuple) -> None:
    x, y = batch
    d = DPSGD(noise_multiplier=0.5, max_grad_norm=1.0)
    up = d.client_update(cnn, x, y, RoundSettings("delta", 3, 0.05), generator=gen(11))
    ref = opacus_reference(cnn, x, y, sigma=0.5, clip=1.0, seed=11, kind="delta", steps=3, lr=0.05)
    assert up.kind == "delta" and up.local_steps == 3 and up.meta["dp_steps"] == 3
    for a, b in zip(up.tensors, ref):
        assert torch.equal(a, b)


def test_dp_sgd_follows_model_changes(cnn: nn.Module, batch: tuple) -> None:
    """The cached wrapper is re-synchronised: after the server step the update is Opacus' for the new θ."""
    from defenda.federation.client import apply_update

    x, y = batch
    d = DPSGD(noise_multiplier=0.3)
    apply_update(cnn, d.client_update(cnn, x, y, SGD, generator=gen(0)), 0.5)
    up = d.client_update(cnn, x, y, SGD, generator=gen(1))
    for a, b in zip(up.tensors, opacus_reference(cnn, x, y, sigma=0.3, clip=1.0, seed=1)):
        assert torch.equal(a, b)
    other = SmallCNN(1, 8, 10, channels=4)  # another architecture: a new wrapper
    up = d.client_update(other, x, y, SGD, generator=gen(2))
    assert [t.shape for t in up.tensors] == [p.shape for p in other.parameters()]


@pytest.mark.parametrize("kind", ["gradient", "delta"])
def test_dp_sgd_leaves_the_model_unchanged(cnn: nn.Module, batch: tuple, kind: str) -> None:
    x, y = batch
    snap = snapshot(cnn)
    DPSGD(noise_multiplier=1.0).client_update(cnn, x, y, RoundSettings(kind, local_steps=2), generator=gen(0))
    assert_unchanged(cnn, snap)
    cnn.eval()  # an eval-mode model stays in eval mode
    snap = snapshot(cnn)
    DPSGD(noise_multiplier=1.0).client_update(cnn, x, y, RoundSettings(kind), generator=gen(0))
    assert_unchanged(cnn, snap)


def test_dp_sgd_fixes_batchnorm_on_a_copy(batch: tuple) -> None:
    x, y = batch
    model = bn_model()
    snap = snapshot(model)
    up = DPSGD(noise_multiplier=0.5).client_update(model, x, y, SGD, generator=gen(3))
    assert "BatchNorm2d→GroupNorm" in up.meta["model_fixed"]
    assert_unchanged(model, snap)
    assert isinstance(model[1], nn.BatchNorm2d)
    assert [t.shape for t in up.tensors] == [p.shape for p in model.parameters()]
    for a, b in zip(up.tensors, opacus_reference(model, x, y, sigma=0.5, clip=1.0, seed=3)):
        assert torch.equal(a, b)


def test_dp_sgd_is_deterministic_per_generator(cnn: nn.Module, batch: tuple) -> None:
    x, y = batch
    d = DPSGD(noise_multiplier=1.0)
    a, b, c = (d.client_update(cnn, x, y, SGD, generator=gen(s)).tensors for s in (5, 5, 6))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not all(torch.equal(u, v) for u, v in zip(a, c))
    g = gen(9)  # draws advance the generator: two rounds differ
    r1, r2 = (d.client_update(cnn, x, y, SGD, generator=g).tensors for _ in range(2))
    assert not torch.equal(r1[0], r2[0])


def test_dp_sgd_noise_has_the_declared_std(cnn: nn.Module, batch: tuple) -> None:
    x, y = batch
    d = DPSGD(noise_multiplier=2.0, max_grad_norm=0.5)
    clean = DPSGD(noise_multiplier=0.0, max_grad_norm=0.5).client_update(cnn, x, y, SGD).tensors
    noisy = d.client_update(cnn, x, y, SGD, generator=gen(0))
    noise = torch.cat([(a - b).flatten() for a, b in zip(noisy.tensors, clean)])
    assert abs(float(noise.std()) / noisy.meta["noise_std"] - 1) < 0.05
    assert noisy.meta["noise_std"] == pytest.approx(2.0 * 0.5 / len(x))


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.parametrize("sigma, q, steps", [(1.0, 32 / 1257, 150), (0.6, 0.01, 500), (3.0, 0.2, 20)])
def test_epsilon_equals_opacus_accountant(accountant: str, sigma: float, q: float, steps: int) -> None:
    from opacus.accountants import PRVAccountant, RDPAccountant

    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=sigma, sample_rate=q)
    expected = acc.get_epsilon(delta=DELTA)
    d = DPSGD(noise_multiplier=sigma, accountant=accountant)
    assert d.epsilon(steps=steps, sample_rate=q, delta=DELTA) == pytest.approx(expected, rel=1e-9)


def test_prv_falls_back_to_rdp_where_its_grid_explodes() -> None:
    from opacus.accountants import RDPAccountant

    d = DPSGD(noise_multiplier=0.01, accountant="prv")
    with pytest.warns(RuntimeWarning, match="PRV"):
        eps = d.epsilon(steps=150, sample_rate=0.025, delta=DELTA)
    acc = RDPAccountant()
    acc.history = [(0.01, 0.025, 150)]
    assert eps == acc.get_epsilon(delta=DELTA) and d.last_accounting["accountant"] == "rdp"


def test_epsilon_edge_cases_and_fedavg_accounting(cnn: nn.Module, batch: tuple) -> None:
    from opacus.accountants import RDPAccountant

    assert DPSGD(noise_multiplier=0.0).epsilon(steps=10, sample_rate=0.1, delta=DELTA) == math.inf
    assert DPSGD(noise_multiplier=1.0).epsilon(steps=0, sample_rate=0.1, delta=DELTA) == 0.0
    # FedAvg: 4 DP steps on the same batch per round = one Gaussian mechanism with σ/√4 per round
    d = DPSGD(noise_multiplier=2.0)
    x, y = batch
    d.client_update(cnn, x, y, RoundSettings("delta", local_steps=4), generator=gen(0))
    acc = RDPAccountant()
    for _ in range(50):
        acc.step(noise_multiplier=1.0, sample_rate=0.05)
    assert d.epsilon(steps=50, sample_rate=0.05, delta=DELTA) == pytest.approx(acc.get_epsilon(delta=DELTA))
    assert d.epsilon(steps=50, sample_rate=0.05, delta=DELTA, local_steps=1) < acc.get_epsilon(delta=DELTA)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_target_epsilon_calibrates_through_opacus(cnn: nn.Module, batch: tuple, accountant: str) -> None:
    from opacus.accountants.utils import get_noise_multiplier

    x, y = batch
    d = DPSGD(target_epsilon=4.0, accountant=accountant, noise_multiplier=123.0)
    with pytest.raises(RuntimeError, match="calibrate"):
        d.client_update(cnn, x, y, SGD)
    sigma = d.calibrate(steps=150, sample_rate=0.025, delta=DELTA)
    assert sigma == get_noise_multiplier(target_epsilon=4.0, target_delta=DELTA, sample_rate=0.025, steps=150,
                                         accountant=accountant)
    up = d.client_update(cnn, x, y, SGD, generator=gen(0))
    assert up.meta["noise_multiplier"] == sigma and up.meta["target_epsilon"] == 4.0
    eps = d.epsilon(steps=150, sample_rate=0.025, delta=DELTA)
    assert 3.9 <= eps <= 4.0 + 1e-9
    for a, b in zip(up.tensors, opacus_reference(cnn, x, y, sigma=sigma, clip=1.0, seed=0)):
        assert torch.equal(a, b)
    if accountant == "rdp":  # epsilon() alone calibrates from its own arguments
        assert DPSGD(target_epsilon=2.0, accountant=accountant).epsilon(
            steps=100, sample_rate=0.05, delta=DELTA) == pytest.approx(2.0, abs=0.02)


def test_dp_sgd_utility_run_reports_epsilon() -> None:
    from defenda.harness.utility import measure_utility
    from defenda.plugins import get_plugins

    job = utility_job("dp-sgd", {"noise_multiplier": 1.0, "accountant": "rdp"}, client_batch_size=16, rounds=3,
                      delta=1e-5)
    acc, eps = measure_utility(get_plugins(), job, torch.device("cpu"))
    assert 0.0 <= acc <= 1.0 and eps is not None and 0 < eps < math.inf


# ------------------------------------------------------------------ every defense


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("kind", ["gradient", "delta"])
def test_every_defense_is_deterministic_and_leaves_the_model(cls: type, kind: str, cnn: nn.Module,
                                                             batch: tuple) -> None:
    info = strength_param(cls.Params)
    d = cls(**{info.name: cls.default_sweep[1]})
    x, y = batch
    snap = snapshot(cnn)
    a = d.client_update(cnn, x, y, RoundSettings(kind, local_steps=2), generator=gen(0))
    b = d.client_update(cnn, x, y, RoundSettings(kind, local_steps=2), generator=gen(0))
    assert_unchanged(cnn, snap)
    assert a.kind == kind and [t.shape for t in a.tensors] == [p.shape for p in cnn.parameters()]
    assert all(torch.equal(u, v) for u, v in zip(a.tensors, b.tensors))
    assert all(torch.isfinite(t).all() for t in a.tensors)
