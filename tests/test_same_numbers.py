"""Same study, same numbers: in-process, with 2 workers, and killed twice and resumed, one study
stores the same rows (every metric, status, ε, test accuracy), the same reconstructions and the same
cached priors, bit for bit.

The study is a tiny federation on digits with the attacks whose numbers depended on how the study
was run (GIAS's GAN prior, GIML's meta-learned generator, checkpointed every 2 of its 6 rounds,
Geiping, SPEAR) under no defense and DP-FedAvg (so ε is compared too). The killed run is a real
``defenda run`` subprocess, SIGKILLed once while a training run writes its observations and once,
with 2 workers (which die with it), while GIML meta-trains (after its round-2 checkpoint); the
resume runs in-process.
"""

from __future__ import annotations

import hashlib
import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from defenda.harness.runner import run_study
from defenda.harness.services import JOB_THREADS
from defenda.harness.study import load_study
from defenda.plugins import load_plugins
from defenda_attacks import _generators

pytestmark = pytest.mark.slow

STUDY = """
[study]
name = "same-numbers"
seeds = [0]
knowledge = ["batch_size", "public_data", "gradient_history"]

[federation]
clients = 4
partition = "dirichlet"
alpha = 0.5
clients_per_round = 2
rounds = 3
local_batch_size = 2
lr = 0.1
attack_rounds = [0, 2]

[task]
name = "digits"
model = "mlp"
widths = [32]

[[attacks]]
name = "geiping"
iterations = 30

[[attacks]]
name = "gias"
latent_iterations = 20
iterations = 20
latent_dim = 16
width = 8
prior_steps = 60
prior_batch = 32

[[attacks]]
name = "giml"
latent_iterations = 20
iterations = 20
latent_dim = 16
width = 8
meta_rounds = 6
checkpoint_every = 2
round_images = 2
inner_latent_iterations = 20
inner_iterations = 10

[[attacks]]
name = "spear"
approx_max_proposals = 500   # a budget in work, not in seconds

[[defenses]]
name = "none"

[[defenses]]
name = "dp-fedavg"        # client-level DP: every row has an ε
noise_multiplier = 1.0
"""

#: columns that say how long or when, not what was measured
TIMING = {"attack_seconds", "trial_seconds", "finished_at", "seconds"}
#: attack_info entries that say where the prior came from (trained now, or read from the cache)
PRIOR_ORIGIN = {"prior_cached", "giml_resumed_from", "giml_inner_loss_last"}
TRIALS = 16


def _stable(info: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in info.items() if k not in PRIOR_ORIGIN and "seconds" not in k}


def _table(out: Path, table: str) -> dict[str, dict[str, Any]]:
    db = sqlite3.connect(out / "results.sqlite")
    db.row_factory = sqlite3.Row
    rows = {}
    for r in db.execute(f"SELECT * FROM {table}"):
        row = {k: r[k] for k in r.keys() if k not in TIMING}
        extra = json.loads(row.pop("extra") or "{}")
        assert extra.get("threads") == JOB_THREADS, f"{table} row {row['key']}: threads not recorded"
        if "attack_info" in extra:
            extra["attack_info"] = _stable(extra["attack_info"])
        row["extra"] = extra
        rows[row["key"]] = row
    db.close()
    return rows


def _digests(out: Path, pattern: str) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob(pattern))}


def _snapshot(out: Path) -> dict[str, Any]:
    """Everything a run leaves that must not depend on how it ran."""
    return {"trials": _table(out, "trials"), "utility": _table(out, "utility"),
            "recon": _digests(out, "recon/*.npz"), "observations": _digests(out, "runs/*/*.pt"),
            "priors": _digests(out, "cache/generators/*.pt")}


def _differences(got: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """Readable differences between two snapshots: section, row or file, field, values."""
    out = []
    for section in want:
        a, b = got[section], want[section]
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                out.append(f"{section} {key}: only in {'the reference' if key in b else 'this run'}")
            elif a[key] != b[key]:
                if isinstance(a[key], dict):
                    fields = [f for f in b[key] if a[key].get(f) != b[key][f]]
                    label = f"{b[key].get('attack', '')}/{b[key].get('defense', '')} r{b[key].get('round')}"
                    out += [f"{section} {label} {f}: {a[key].get(f)!r} != {b[key][f]!r}" for f in fields]
                else:
                    out.append(f"{section} {key}: other bytes")
    return out


def _trial_rows(out: Path) -> int:
    try:
        db = sqlite3.connect(f"file:{out / 'results.sqlite'}?mode=ro", uri=True, timeout=1)
        try:
            return int(db.execute("SELECT COUNT(*) FROM trials").fetchone()[0])
        finally:
            db.close()
    except sqlite3.Error:  # not created yet
        return 0


def _run_until(toml: Path, out: Path, workers: int, condition: Callable[[Path], bool], limit_s: float = 180) -> bool:
    """``defenda run`` on ``out``, SIGKILLed as soon as ``condition(out)``; True if it was killed."""
    cmd = [sys.executable, "-c", "import sys; from defenda.cli import main; sys.exit(main(sys.argv[1:]))",
           "run", str(toml), "--out", str(out), "--workers", str(workers), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + limit_s
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if condition(out):
                proc.send_signal(signal.SIGKILL)
                proc.wait(30)
                return True
            time.sleep(0.01)
        assert proc.poll() is not None, "the study did not finish in time"
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        assert proc.stderr is not None
        proc.stderr.close()


def _observations_written(out: Path) -> bool:
    return any((out / "runs").glob("*/*.pt"))


def _giml_meta_training(out: Path) -> bool:
    return any((out / "cache" / "generators").glob("giml-*-round2.pt"))


@pytest.fixture(scope="module")
def study_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("study") / "same-numbers.toml"
    path.write_text(STUDY)
    return path


@pytest.fixture(scope="module")
def in_process(study_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The reference: one worker, in this process (torch runs on 2 threads here, conftest)."""
    out = tmp_path_factory.mktemp("inline")
    _generators._MEMO.clear()  # trained here, not taken from an earlier test's memo
    counts = run_study(load_study(study_file, load_plugins().registry), out, progress=False)
    assert counts["ok"] == TRIALS, counts
    return _snapshot(out)


def test_the_study_covers_the_attacks_that_moved(in_process: dict[str, Any]) -> None:
    rows = in_process["trials"].values()
    assert {r["attack"] for r in rows} == {"geiping", "gias", "giml", "spear"}
    assert all(r["status"] == "ok" for r in rows)
    assert len(in_process["observations"]) == 4 and len(in_process["recon"]) == TRIALS
    assert any("giml" in name for name in in_process["priors"])
    assert any("gias" in name for name in in_process["priors"])


def test_two_workers_store_the_same_numbers(study_file: Path, tmp_path: Path, in_process: dict[str, Any]) -> None:
    counts = run_study(load_study(study_file, load_plugins().registry), tmp_path, workers=2, progress=False)
    assert counts["ok"] == TRIALS
    assert not _differences(_snapshot(tmp_path), in_process)


def test_killed_and_resumed_stores_the_same_numbers(study_file: Path, tmp_path: Path,
                                                    in_process: dict[str, Any]) -> None:
    # in-process while the training runs write their observations; with 2 workers (which die with
    # the runner) while GIML meta-trains, other trials already stored
    assert _run_until(study_file, tmp_path, 1, _observations_written)
    assert _run_until(study_file, tmp_path, 2, _giml_meta_training)
    before = _trial_rows(tmp_path)
    assert before < TRIALS
    _generators._MEMO.clear()  # as in a new process: the priors come from the disk cache (or are trained)
    counts = run_study(load_study(study_file, load_plugins().registry), tmp_path, progress=False)
    assert counts["resumed"] == before and counts["ok"] == TRIALS - before
    assert not _differences(_snapshot(tmp_path), in_process)


def test_a_prior_does_not_depend_on_the_callers_threads() -> None:
    """The GAN prior trains on its own fixed thread count, whatever the caller set."""
    images = torch.rand(24, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    states = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            g = _generators.train_gan_prior(images, latent_dim=8, width=4, steps=15, batch_size=8, seed=1)
            assert torch.get_num_threads() == threads  # the caller's count is restored
            states.append(g.state_dict())
    finally:
        torch.set_num_threads(previous)
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_resumed_meta_training_ends_in_the_same_generator(tmp_path: Path) -> None:
    """GIML meta-trained for 4 rounds at once, or for 2 and then resumed from that checkpoint: the same bits
    (the checkpoint holds the global model after its round's server step)."""
    from defenda.federation import GradientHistory
    from defenda.models import MLP
    from defenda_attacks import giml

    gen = torch.Generator().manual_seed(0)
    history = GradientHistory(torch.randn(40, 1, 8, 8, generator=gen), torch.arange(40) % 10, lr=0.1)
    model = MLP(64, 10, (16,))
    s = giml.MetaSettings(latent_dim=8, width=4, round_images=2, inner_latent_iterations=3, inner_latent_lr=0.03,
                          inner_iterations=2, inner_lr=1e-3, inner_latent_norm=1e-3, inner_tv=1e-4, meta_lr=0.5,
                          seed=0)
    kw: dict[str, Any] = {"image_shape": (1, 8, 8), "mean": torch.zeros(1, 1, 1), "std": torch.ones(1, 1, 1),
                          "num_classes": 10, "checkpoint_every": 2}
    giml._MEMO.clear()
    at_once, _ = giml.meta_train(model, history, s, rounds=4, cache_dir=str(tmp_path / "a"), **kw)
    giml._MEMO.clear()
    giml.meta_train(model, history, s, rounds=2, cache_dir=str(tmp_path / "b"), **kw)
    giml._MEMO.clear()  # a new process: only the checkpoint on disk
    resumed, info = giml.meta_train(model, history, s, rounds=4, cache_dir=str(tmp_path / "b"), **kw)
    giml._MEMO.clear()
    assert info["giml_resumed_from"] == 2
    a, b = at_once.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the checkpoint files too, byte for byte (same key, same contents, so the same file)
    assert _digests(tmp_path / "a", "generators/*round4.pt") == _digests(tmp_path / "b", "generators/*round4.pt")
