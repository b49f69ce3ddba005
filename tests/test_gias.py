"""GIAS and GIML (Jeon et al. 2021): generators, the cached prior, the searches, GIML's meta-learning,
and the headline orderings on digits (GIAS ≈ Geiping > latent-only at B = 16, GIAS > Geiping and > latent-only
under 90% pruning at B = 4, a GIML generator > an untrained one).

The quality tests are the small versions (3 seeds, fewer iterations) of
``benchmarks/bench_gias.py``, which holds the 10-seed numbers quoted in the README.
"""

from __future__ import annotations

import os
import pickle
import statistics
from pathlib import Path

import pytest
import torch

from defenda import Knowledge, SharedUpdate
from defenda.data import load_digits_task
from defenda.federation import GradientHistory
from defenda.federation.client import compute_update
from defenda.models import SmallCNN
from defenda.testing.trials import harness_trial
from defenda_attacks._generators import (
    CheckpointError,
    DCGANGenerator,
    cache_key,
    load_generator_state,
    load_state,
    save_state,
)
from defenda_attacks.geiping import Geiping
from defenda_attacks.gias import GIAS
from defenda_attacks.gias import gradient_matching_loss as shared_loss
from defenda_attacks.giml import GIML, MetaSettings, meta_train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return load_digits_task()


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("gias-cache"))


def _knowledge(data, y: torch.Tensor, cache_dir: str | None) -> Knowledge:
    return Knowledge(space=data.space, batch_size=len(y), labels=y, public=data.public,
                     history=GradientHistory(*data.public, lr=0.1), seed=0, cache_dir=cache_dir)


def _prune(update: SharedUpdate, fraction: float) -> SharedUpdate:
    """Per-tensor top-k magnitude pruning, keeping ⌊(1 − r)·numel⌋ entries (the ``prune`` defense)."""
    out = []
    for t in update.tensors:
        k = int((1 - fraction) * t.numel() + 1e-6)
        flat = torch.zeros_like(t).flatten()
        if k:
            idx = t.flatten().abs().topk(k).indices
            flat[idx] = t.flatten()[idx]
        out.append(flat.view_as(t))
    return update.replace(out, masks=[(t != 0).to(t.dtype) for t in out], prune_fraction=fraction)


def _trial(data, attack, seed: int, batch: int, cache_dir: str | None, prune: float = 0.0) -> float:
    """One trial as the harness runs it (seeded model and batch, seed + 1 before the attack); batch PSNR."""
    return harness_trial(data, lambda: SmallCNN(1, 8, 10), attack, seed=seed, batch=batch,
                         knowledge={"public": data.public, "history": GradientHistory(*data.public, lr=0.1),
                                    "seed": 0, "cache_dir": cache_dir},
                         transform=(lambda u, _gen: _prune(u, prune)) if prune else None).psnr


def _median(data, attack, seeds, batch, cache_dir, prune=0.0) -> tuple[float, list[float]]:
    values = [_trial(data, attack, s, batch, cache_dir, prune) for s in seeds]
    return statistics.median(values), values


# ----------------------------------------------------------------------------- generators and checkpoints


@pytest.mark.parametrize(("shape", "blocks"), [((1, 8, 8), 1), ((3, 16, 16), 2), ((1, 28, 28), 2), ((3, 32, 32), 3)])
def test_generator_family_covers_the_task_sizes(shape, blocks) -> None:
    g = DCGANGenerator(shape, latent_dim=16, width=8).eval()
    with torch.no_grad():
        out = g(torch.randn(5, 16))
    assert out.shape == (5, *shape)
    assert float(out.abs().max()) <= 1.0
    ups = [m for m in g.modules() if isinstance(m, torch.nn.ConvTranspose2d) and m.stride == (2, 2)]
    assert len(ups) == blocks
    assert all(m.bias is None for m in g.modules() if isinstance(m, torch.nn.ConvTranspose2d))


def test_checkpoint_round_trip_with_weights_only(tmp_path: Path) -> None:
    torch.manual_seed(0)
    g = DCGANGenerator((1, 8, 8), 8, 8)
    path = tmp_path / "g.pt"
    save_state(g.state_dict(), path)
    state = torch.load(path, weights_only=True)  # a plain state_dict: loads under the safe unpickler
    h = DCGANGenerator((1, 8, 8), 8, 8)
    load_generator_state(h, load_state(path))
    z = torch.randn(3, 8)
    torch.testing.assert_close(g.eval()(z), h.eval()(z))
    assert set(state) == set(g.state_dict())
    assert not list(tmp_path.glob("*.tmp"))  # atomic write left no temp file


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_or_foreign_checkpoints_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"net.0.weight": _Payload(str(marker))}, evil)  # a pickle that would run code when loaded
    with pytest.raises(CheckpointError, match="refusing"):
        load_state(evil)
    assert not marker.exists()
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(CheckpointError):
        load_state(raw)
    assert not marker.exists()
    wrong = tmp_path / "wrong.pt"
    save_state(DCGANGenerator((1, 8, 8), 8, 4).state_dict(), wrong)
    with pytest.raises(CheckpointError, match="does not fit"):
        load_generator_state(DCGANGenerator((1, 8, 8), 8, 8), load_state(wrong))


def test_cache_key_depends_on_settings_and_data() -> None:
    a = torch.zeros(3, 2)
    assert cache_key("k", {"x": 1}, a) == cache_key("k", {"x": 1}, a.clone())
    assert cache_key("k", {"x": 1}, a) != cache_key("k", {"x": 2}, a)
    assert cache_key("k", {"x": 1}, a) != cache_key("k", {"x": 1}, a + 1e-3)


def test_gias_prior_is_trained_once_and_cached_on_disk(digits, tmp_path: Path) -> None:
    from defenda_attacks import _generators

    small = dict(prior_steps=20, latent_iterations=5, iterations=5)
    y = digits.train[1][:2]
    model = SmallCNN(1, 8, 10).eval()
    update = compute_update(model, digits.train[0][:2], y)
    torch.manual_seed(5)
    first = GIAS(**small).reconstruct(update, model, _knowledge(digits, y, str(tmp_path)))
    files = list((tmp_path / "generators").glob("gias-gan-*.pt"))
    assert [f.name for f in files] == [first.info["prior"] + ".pt"] and first.info["prior_cached"] is False
    _generators._MEMO.clear()  # a new process: only the disk cache is left
    torch.manual_seed(5)
    second = GIAS(**small).reconstruct(update, model, _knowledge(digits, y, str(tmp_path)))
    assert second.info["prior_cached"] is True and second.info["prior"] == first.info["prior"]
    torch.testing.assert_close(first.inputs, second.inputs)
    other = GIAS(**{**small, "prior_steps": 21}).reconstruct(update, model, _knowledge(digits, y, str(tmp_path)))
    assert other.info["prior_cached"] is False and len(list((tmp_path / "generators").glob("*.pt"))) == 2
    # a tampered cache file is refused, not executed
    marker = tmp_path / "pwned"
    torch.save({"x": _Payload(str(marker))}, files[0])
    _generators._MEMO.clear()
    with pytest.raises(CheckpointError):
        GIAS(**small).reconstruct(update, model, _knowledge(digits, y, str(tmp_path)))
    assert not marker.exists()


def test_training_lock_makes_a_second_worker_wait(tmp_path: Path) -> None:
    """Two workers reaching the same uncached prior: the second waits for the first, then loads."""
    import threading
    import time

    from defenda_attacks._generators import training_lock

    events: list[str] = []
    inside = threading.Event()

    def first() -> None:
        with training_lock(str(tmp_path), "gias-gan-k"):
            events.append("first in")
            inside.set()
            time.sleep(0.3)
            events.append("first out")

    t = threading.Thread(target=first)
    t.start()
    inside.wait(5)
    with training_lock(str(tmp_path), "gias-gan-k"):
        events.append("second in")
    t.join()
    assert events == ["first in", "first out", "second in"]
    with training_lock(None, "no-cache"):  # without a cache directory: no lock, no file
        pass


# ----------------------------------------------------------------------------- the attack's contract


def test_gias_and_giml_pass_the_attack_contract() -> None:
    from defenda.testing import check_attack

    rec = check_attack(GIAS, {"prior_steps": 5, "latent_iterations": 3, "iterations": 3})
    assert rec.info["prior_source"] == "public_data"
    rec = check_attack(GIML, {"meta_rounds": 2, "inner_latent_iterations": 2, "inner_iterations": 2,
                              "latent_iterations": 3, "iterations": 3})
    assert rec.info["prior_source"] == "gradients" and rec.info["giml_rounds"] == 2


def test_requirements_tell_the_threat_models_apart() -> None:
    assert GIAS.requires.knowledge == frozenset({"public_data"})
    assert GIML.requires.knowledge == frozenset({"gradient_history"})  # gradients only, never an image
    for cls in (GIAS, GIML):
        assert cls.requires.task_kinds == frozenset({"image"})
        assert cls.requires.updates == frozenset({"gradient", "delta"})
    assert GIAS.prior_source == "public_data" and GIML.prior_source == "gradients"


def test_gias_and_giml_are_registered_by_the_builtin_plugin() -> None:
    from defenda.testing import builtin_plugins

    registry = builtin_plugins().registry
    assert registry.get("attack", "gias").cls is GIAS
    assert registry.get("attack", "giml").cls is GIML


def test_gias_is_skipped_without_public_data() -> None:
    from types import SimpleNamespace

    from defenda.harness.trial import skip_reason
    from defenda.testing import make_tiny_case

    def cell(*knowledge: str) -> SimpleNamespace:  # the parts of a Trial that skip_reason reads
        return SimpleNamespace(server="honest", federation=SimpleNamespace(update="gradient"), knowledge=knowledge)

    case = make_tiny_case()
    reason = skip_reason(GIAS(), cell("batch_size"), case.data)  # type: ignore[arg-type]
    assert reason is not None and "public_data" in reason
    reason = skip_reason(GIML(), cell("public_data"), case.data)  # type: ignore[arg-type]
    assert reason is not None and "gradient_history" in reason


def test_giml_meta_learns_from_gradients_only(digits, monkeypatch: pytest.MonkeyPatch) -> None:
    """GIML runs with no image at all in its knowledge: the public split is not granted."""
    y = digits.train[1][:2]
    torch.manual_seed(0)
    model = SmallCNN(1, 8, 10).eval()
    update = compute_update(model, digits.train[0][:2], y)
    knowledge = Knowledge(space=digits.space, history=GradientHistory(*digits.public, lr=0.1))
    seen: list[int] = []
    original = GradientHistory.rounds

    def spy(self, *args, **kwargs):
        for r in original(self, *args, **kwargs):
            assert all(isinstance(g, torch.Tensor) for grads in r.gradients for g in grads)
            seen.append(r.round)
            yield r

    monkeypatch.setattr(GradientHistory, "rounds", spy)
    rec = GIML(meta_rounds=2, round_images=2, inner_latent_iterations=2, inner_iterations=2, latent_iterations=3,
               iterations=3).reconstruct(update, model, knowledge)
    assert seen == [1, 2] and rec.inputs.shape == (2, 1, 8, 8)
    assert rec.info["prior_source"] == "gradients"


def test_gias_uses_the_shared_matching_loss() -> None:
    from defenda import inversion

    assert shared_loss is inversion.gradient_matching_loss


def test_gias_is_deterministic_and_stays_in_the_box(digits, cache) -> None:
    y = digits.train[1][:3]
    torch.manual_seed(3)
    model = SmallCNN(1, 8, 10).eval()
    update = compute_update(model, digits.train[0][:3], y)
    runs = []
    for _ in range(2):
        torch.manual_seed(11)
        runs.append(GIAS(prior_steps=20, latent_iterations=10, iterations=10, restarts=2).reconstruct(
            update, model, _knowledge(digits, y, cache)))
    torch.testing.assert_close(runs[0].inputs, runs[1].inputs)
    lo, hi = _knowledge(digits, y, None).box
    assert bool(((runs[0].inputs >= lo - 1e-5) & (runs[0].inputs <= hi + 1e-5)).all())
    assert runs[0].info["restarts"] == 2 and runs[0].info["loss"] <= runs[0].info["latent_loss"] + 1e-6


# ----------------------------------------------------------------------------- GIML


def test_simulated_federation_hands_out_gradients_and_drifts(digits) -> None:
    torch.manual_seed(0)
    model = SmallCNN(1, 8, 10).eval()
    before = [p.detach().clone() for p in model.parameters()]
    rounds = list(GradientHistory(*digits.public, lr=0.1).rounds(model, rounds=3, clients=4))
    assert [r.round for r in rounds] == [1, 2, 3]
    for r in rounds:
        assert len(r.gradients) == 4
        assert all(isinstance(g, list) and len(g) == len(before) for g in r.gradients)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the global model drifted


def _meta_settings(**over) -> MetaSettings:
    base = dict(latent_dim=8, width=8, round_images=2, inner_latent_iterations=3, inner_latent_lr=0.03,
                inner_iterations=3, inner_lr=1e-3, inner_latent_norm=1e-3, inner_tv=1e-4, meta_lr=1e-2,
                seed=0)
    return MetaSettings(**{**base, **over})


def test_giml_checkpoints_resume_exactly(digits, tmp_path: Path) -> None:
    from defenda_attacks import _generators

    torch.manual_seed(0)
    model = SmallCNN(1, 8, 10).eval()
    common = dict(image_shape=(1, 8, 8), mean=digits.mean, std=digits.std, num_classes=10, checkpoint_every=2)
    straight, info = meta_train(model, GradientHistory(*digits.public, lr=0.1), _meta_settings(), rounds=4, cache_dir=None, **common)
    assert info["giml_resumed_from"] == 0
    _generators._MEMO.clear()
    meta_train(model, GradientHistory(*digits.public, lr=0.1), _meta_settings(), rounds=3, cache_dir=str(tmp_path), **common)
    names = sorted(f.name.rsplit("-", 1)[1] for f in (tmp_path / "generators").glob("giml-*.pt"))
    assert names == ["round2.pt", "round3.pt"]
    _generators._MEMO.clear()
    resumed, info = meta_train(model, GradientHistory(*digits.public, lr=0.1), _meta_settings(), rounds=4, cache_dir=str(tmp_path), **common)
    assert info["giml_resumed_from"] == 3
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)  # a resumed meta-training is bit-identical to an uninterrupted one
    untrained, _ = meta_train(model, GradientHistory(*digits.public, lr=0.1), _meta_settings(), rounds=0, cache_dir=None, **common)
    assert any(not torch.equal(a, b) for a, b in zip(untrained.state_dict().values(),
                                                      straight.state_dict().values()))
    assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------- quality (small versions of the bench)
# The budgets are the benchmark's (1000 iterations: GIAS 400 latent + 600 parameter steps); only the
# seeds are fewer. At half the budget GIAS does not yet beat Geiping at B = 16 (see the bench notes).

SEEDS = (0, 1, 2)
BUDGET = 1000


def _three(budget: int = BUDGET) -> dict[str, object]:
    return {"gias": GIAS(latent_iterations=400, iterations=budget - 400),
            "latent": GIAS(latent_iterations=budget, iterations=0),
            "geiping": Geiping(iterations=budget)}


@pytest.mark.slow
def test_gias_matches_geiping_and_beats_latent_only_at_batch_16(digits, cache) -> None:
    """B = 16, no defense, equal budgets: median PSNR GIAS > latent-only (GI-z) + 2 dB, GIAS ≥ Geiping − 1 dB.

    Not "GIAS > Geiping": over 10 seeds that held on one machine (23.8 vs 21.6 dB) and was a
    tie on another (22.8 vs 22.7; README, GIAS and GIML), the seeds' values moving with the
    CPU's rounding.
    """
    res = {name: _median(digits, attack, SEEDS, 16, cache) for name, attack in _three().items()}
    assert res["gias"][0] > res["geiping"][0] - 1.0, res
    assert res["gias"][0] > res["latent"][0] + 2.0, res


@pytest.mark.slow
def test_gias_ordering_under_90_percent_pruning_at_batch_4(digits, cache) -> None:
    res = {name: _median(digits, attack, SEEDS, 4, cache, prune=0.9) for name, attack in _three().items()}
    assert res["gias"][0] > res["geiping"][0], res
    assert res["gias"][0] > res["latent"][0], res


@pytest.mark.slow
def test_giml_generator_beats_an_untrained_one_and_improves_with_rounds(digits, cache) -> None:
    """B = 4, 90% pruning: GIAS with the GIML generator after 20 rounds > after 10 rounds and > untrained."""
    seeds = (0, 1, 2, 3, 4)
    untrained, uv = _median(digits, GIML(meta_rounds=0), seeds, 4, cache, prune=0.9)
    ten, tv = _median(digits, GIML(meta_rounds=10), seeds, 4, cache, prune=0.9)
    twenty, wv = _median(digits, GIML(meta_rounds=20), seeds, 4, cache, prune=0.9)  # resumes from round 10
    assert twenty > untrained, (wv, uv)
    assert twenty > ten, (wv, tv)
