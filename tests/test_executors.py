"""Local process pool and Dask run the same trials and store the same rows as the in-process run."""

from __future__ import annotations

import copy
import sqlite3
from pathlib import Path

import pytest

from conftest import TINY_STUDY
from defenda.harness.runner import run_study
from defenda.harness.study import parse_study
from defenda.plugins import load_plugins

COLS = ("key", "status", "psnr", "ssim", "label_acc", "test_acc")


def _study():
    raw = copy.deepcopy(TINY_STUDY)
    raw["defenses"] = [{"name": "none"}, {"name": "gaussian-noise", "std": 0.1}]
    return parse_study(raw, load_plugins().registry)


def _rows(out: Path) -> list[tuple]:
    db = sqlite3.connect(out / "results.sqlite")
    return sorted(db.execute(f"SELECT {', '.join(COLS)} FROM trials").fetchall())


@pytest.fixture(scope="module")
def inline_rows(tmp_path_factory) -> list[tuple]:
    out = tmp_path_factory.mktemp("inline")
    run_study(_study(), out, progress=False)
    return _rows(out)


def test_two_local_workers_store_the_same_rows(tmp_path: Path, inline_rows) -> None:
    counts = run_study(_study(), tmp_path, workers=2, progress=False)
    assert counts["ok"] == 4
    assert _rows(tmp_path) == inline_rows


def test_dask_local_cluster_stores_the_same_rows(tmp_path: Path, inline_rows) -> None:
    distributed = pytest.importorskip("dask.distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        counts = run_study(_study(), tmp_path, executor="dask", scheduler=client, progress=False)
    assert counts["ok"] == 4
    assert _rows(tmp_path) == inline_rows


FED_COLS = ("key", "status", "round", "client", "num_samples", "aggregation_size", "mae", "test_acc", "epsilon")


def _federated_study():
    raw = {
        "study": {"name": "fl-exec", "seeds": [0], "knowledge": ["batch_size"]},
        # DP-SGD draws Poisson batches: at b = 4 none of the attacked ones is empty
        "federation": {"clients": 6, "partition": "dirichlet", "clients_per_round": 3, "rounds": 3,
                       "local_batch_size": 4},
        "task": {"name": "breast-cancer", "model": "mlp", "widths": [32]},
        "attacks": [{"name": "spear", "max_proposals": 50_000}],
        "defenses": [{"name": "none"}, {"name": "secure-aggregation", "quantization_range": 0},
                     {"name": "dp-sgd", "noise_multiplier": 1.0}],
    }
    return parse_study(raw, load_plugins().registry)


def _federated_rows(out: Path) -> list[tuple]:
    db = sqlite3.connect(out / "results.sqlite")
    return sorted(db.execute(f"SELECT {', '.join(FED_COLS)} FROM trials").fetchall())


def test_federated_runs_are_jobs_of_every_executor(tmp_path: Path) -> None:
    """Training runs and the trials that read their observations run in-process, in local workers and
    on Dask, and store the same rows."""
    run_study(_federated_study(), tmp_path / "inline", progress=False)
    inline = _federated_rows(tmp_path / "inline")
    assert len(inline) == 6 and {r[1] for r in inline} == {"ok"}
    run_study(_federated_study(), tmp_path / "pool", workers=2, progress=False)
    assert _federated_rows(tmp_path / "pool") == inline
    distributed = pytest.importorskip("dask.distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        run_study(_federated_study(), tmp_path / "dask", executor="dask", scheduler=client, progress=False)
    assert _federated_rows(tmp_path / "dask") == inline
