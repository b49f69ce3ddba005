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
