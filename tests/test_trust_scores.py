"""Numbers a reviewer can trust: valid domains, prior-only baselines and success rates (issue 14)."""

from __future__ import annotations

import math

import pytest
import torch

from defenda.harness.services import load_task
from defenda.harness.trial import score
from defenda.metrics import (
    IDENTIFICATION_CANDIDATES,
    clip_to_domain,
    distractors,
    mae,
    prior_guesses,
    psnr,
    success_rates,
    unit_images,
)
from defenda.plugins import get_plugins
from defenda.records import Reconstruction, TaskData


@pytest.fixture(scope="module")
def plugins():
    return get_plugins()


def _task(plugins, name: str) -> TaskData:
    return load_task(plugins.registry, name, {})[1]


def _hand_made() -> TaskData:
    """Four 1×2×2 'images' in unit space = model space (mean 0, std 1), a public split of 12."""
    gen = torch.Generator().manual_seed(0)
    public = torch.rand(12, 1, 2, 2, generator=gen)
    train = torch.rand(4, 1, 2, 2, generator=gen)
    labels = torch.tensor([0, 1, 1, 0])
    return TaskData("hand", "image", (1, 2, 2), 2, (train, labels), (train, labels),
                    (public, torch.tensor([1] * 7 + [0] * 5)), torch.zeros(1, 1, 1), torch.ones(1, 1, 1))


def test_mean_baseline_is_the_metric_of_the_public_mean(plugins) -> None:
    data = _hand_made()
    x, y = data.train
    _, extra, *_ = score(plugins, x, y, Reconstruction(x.clone(), y.clone(), {}), data)
    mean = data.public[0].double().mean(dim=0, keepdim=True).expand_as(x).float()
    assert extra["baseline"]["mean"]["psnr"] == pytest.approx(psnr(unit_images(x, data), unit_images(mean, data)))
    assert extra["baseline"]["mean"]["label_acc"] == pytest.approx(float((y == 1).double().mean()))  # majority 1
    assert extra["baseline"]["sample"]["psnr"] < 300


def test_sample_baseline_never_guesses_a_distractor() -> None:
    data = _hand_made()
    x = data.train[0]
    pools = distractors(x, len(data.public[0]), IDENTIFICATION_CANDIDATES)
    guess = prior_guesses(x, data)["sample"].inputs
    for i, pool in enumerate(pools):
        assert not any(torch.equal(guess[i], data.public[0][j]) for j in pool)


def test_identification_of_the_truth_is_one_and_of_the_prior_is_chance(plugins) -> None:
    for name in ("digits", "breast-cancer"):
        data = _task(plugins, name)
        x = data.train[0]
        assert success_rates(x, x.clone(), data)["ident_acc"] == 1.0
        kappa, n = 1 / IDENTIFICATION_CANDIDATES, len(x)
        for guess in prior_guesses(x, data).values():
            rate = success_rates(x, guess.inputs, data)["ident_acc"]
            assert abs(rate - kappa) < 4 * math.sqrt(kappa * (1 - kappa) / n) + 0.01, (name, rate)


def test_exact_and_recognised_rates_count_samples_not_means(plugins) -> None:
    data = _task(plugins, "digits")
    x = data.train[0][:4]
    rec = x.clone()
    rec[1:] = 0.0  # one exact sample among three failures: a mean PSNR of ~80 dB
    rates = success_rates(x, rec, data)
    assert rates["exact_rate"] == 0.25 and rates["recognised_rate"] == 0.25
    assert success_rates(x, x.clone(), data, {"matched_mask": [True, False, True, True]})["exact_rate"] == 0.75


def test_reconstructions_are_scored_inside_the_domain(plugins) -> None:
    data = _task(plugins, "breast-cancer")
    x, y = data.train[0][:8], data.train[1][:8]
    clipped, fraction = clip_to_domain(x.clone(), data)
    assert torch.equal(clipped, x) and fraction == 0.0
    wild = x * 1e20
    wild[0, 0] = float("nan")
    values, extra, *_ = score(plugins, x, y, Reconstruction(wild, None, {}), data)
    assert extra["clipped_fraction"] == 1.0
    assert values["mae"] < 10  # standard deviations; unclipped this was ~1e20
    inside, _ = clip_to_domain(wild, data)
    assert torch.isfinite(inside).all() and mae(x, inside) == pytest.approx(values["mae"])
    image = _task(plugins, "digits")
    xi = image.train[0][:2]
    out, frac = clip_to_domain(xi * 1e6, image)
    assert frac > 0 and 0 <= float(image.to_unit(out).min()) and float(image.to_unit(out).max()) <= 1 + 1e-6


def test_measured_identification_never_beats_its_bound(tmp_path) -> None:
    """A weak DP-SGD lets Geiping identify most samples; the bound for a record in the attacked batch
    must still hold (one-sided 95% Clopper-Pearson lower bound ≤ γ). The amplified bound of a record
    chosen before sampling is far lower — comparing with it would flag a false violation."""
    import json
    import sqlite3

    from scipy.stats import beta

    from defenda.harness.runner import run_study
    from defenda.harness.study import parse_study

    raw = {
        "study": {"name": "rero", "seeds": [0, 1], "knowledge": ["batch_size"]},
        "federation": {"clients": 4, "partition": "iid", "clients_per_round": 4, "rounds": 1, "attack_rounds": [0],
                       "targets_per_round": 4, "local_batch_size": 2},
        "task": {"name": "digits", "model": "mlp", "widths": [32]},
        "attacks": [{"name": "geiping", "iterations": 150}],
        "defenses": [{"name": "dp-sgd", "noise_multiplier": 0.05}],
    }
    run_study(parse_study(raw, get_plugins().registry), tmp_path, progress=False)
    rows = sqlite3.connect(tmp_path / "results.sqlite").execute(
        "SELECT ident_acc, num_samples, rero_bound, extra FROM trials WHERE status = 'ok'").fetchall()
    assert rows
    k = sum(round(r[0] * r[1]) for r in rows)
    n = sum(r[1] for r in rows)
    bound = min(r[2] for r in rows)
    any_record = max(json.loads(r[3])["rero"]["bound_any_record"] for r in rows)
    lower = beta.ppf(0.05, k, n - k + 1) if k else 0.0
    assert k / n >= 0.5, (k, n)  # the attack works, so the check below can fail
    assert lower <= bound, (k, n, lower, bound)
    assert lower > any_record  # the amplified bound is for another experiment
