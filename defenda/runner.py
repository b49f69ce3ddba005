"""The study runner: expand the grid, skip what the store already has, run the rest, write rows.

Phase 1 measures utility once per (task, defense, strength, seed); phase 2
runs the attack trials and writes each row with that utility. Jobs run in
an executor (in-process, a local process pool, or Dask); only this process
writes the store, one committed transaction per row, so a crash loses at most
the jobs in flight and re-running the same command resumes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from defenda.plugins import Plugins, get_plugins, set_plugins
from defenda.store import Store
from defenda.study import Study

Job = tuple[Callable[..., Any], tuple[Any, ...]]


def _init_worker(threads: int) -> None:
    import torch

    os.environ["DEFENDA_QUIET_PLUGINS"] = "1"  # the parent already reported plugin problems once
    torch.set_num_threads(threads)


class InlineExecutor:
    """Runs jobs one after another in this process (``--workers 1``)."""

    def map_unordered(self, jobs: list[Job]) -> Iterator[Any]:
        for fn, args in jobs:
            yield fn(*args)

    def close(self) -> None:
        pass


class ProcessExecutor:
    """A local process pool (``--workers N``); results come back as they finish."""

    def __init__(self, workers: int) -> None:
        import multiprocessing as mp

        threads = max(1, (os.cpu_count() or 1) // workers)
        # spawn, not fork: forking a process that already started torch's thread pools can deadlock.
        self.pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                                        initializer=_init_worker, initargs=(threads,))

    def map_unordered(self, jobs: list[Job]) -> Iterator[Any]:
        futures: list[Future[Any]] = [self.pool.submit(fn, *args) for fn, args in jobs]
        try:
            for fut in as_completed(futures):
                yield fut.result()
        finally:
            for fut in futures:
                fut.cancel()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class DaskExecutor:
    """Runs the same jobs on a Dask distributed cluster (``--executor dask --scheduler ADDRESS``)."""

    def __init__(self, scheduler: str | Any | None) -> None:
        from dask.distributed import Client

        self.client = scheduler if isinstance(scheduler, Client) else Client(scheduler)
        self._own = not isinstance(scheduler, Client)

    def map_unordered(self, jobs: list[Job]) -> Iterator[Any]:
        from dask.distributed import as_completed as dask_completed

        futures = [self.client.submit(fn, *args, pure=False) for fn, args in jobs]
        for fut in dask_completed(futures):
            yield fut.result()

    def close(self) -> None:
        if self._own:
            self.client.close()


def make_executor(workers: int = 1, executor: str = "local", scheduler: Any = None) -> Any:
    if executor == "dask":
        return DaskExecutor(scheduler)
    return ProcessExecutor(workers) if workers > 1 else InlineExecutor()


class Progress:
    """A tqdm progress bar with ETA on stderr (silent when disabled)."""

    def __init__(self, total: int, enabled: bool, desc: str) -> None:
        self.bar = None
        if enabled and total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="job", file=sys.stderr, dynamic_ncols=True)

    def update(self, postfix: str = "") -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_study(
    study: Study,
    out_dir: str | Path,
    *,
    workers: int = 1,
    device: str = "cpu",
    executor: str = "local",
    scheduler: Any = None,
    progress: bool = True,
    plugins: Plugins | None = None,
    retry_errors: bool = False,
) -> dict[str, int]:
    """Run every trial of ``study`` not yet in ``out_dir``'s store. Returns counts by status."""
    from defenda.trial import run_trial, run_utility

    plugins = plugins or get_plugins()
    if executor == "local" and workers == 1:
        set_plugins(plugins)  # in-process trials use exactly these plugins
    trials = study.trials()
    counts = {"ok": 0, "error": 0, "skipped": 0, "resumed": 0}
    with Store(out_dir) as store:
        if retry_errors:
            store.db.execute("DELETE FROM trials WHERE status='error'")
        done = store.done_keys()
        todo = [t for t in trials if t["key"] not in done]
        counts["resumed"] = len(trials) - len(todo)
        utility_jobs = _utility_jobs(todo, store)
        bar = Progress(len(utility_jobs) + len(todo), progress, study.name)
        pool = make_executor(workers, executor, scheduler)
        try:
            for row in pool.map_unordered([(run_utility, (job, device)) for job in utility_jobs]):
                store.add_utility(row)
                bar.update(f"utility {row['defense']} acc={row.get('test_acc') or 0:.2f}")
            cache_dir = str(Path(out_dir) / "cache")
            jobs = [(run_trial, ({**t, "cache_dir": cache_dir}, device)) for t in todo]
            by_key = {t["key"]: t for t in todo}
            for row, arrays in pool.map_unordered(jobs):
                util = store.utility(row["utility_key"]) or {}
                row["test_acc"], row["epsilon"] = util.get("test_acc"), util.get("epsilon")
                store.add_trial(row, arrays)
                counts[row["status"]] += 1
                plugins.notify_trial_finished(by_key[row["key"]], row)
                bar.update(f"{row['attack']}/{row['defense']} {row['status']}")
        finally:
            pool.close()
            bar.close()
    return counts


def _utility_jobs(todo: list[dict[str, Any]], store: Store) -> list[dict[str, Any]]:
    """One utility job per distinct key among the pending trials, minus those already stored."""
    have = store.done_keys("utility")
    jobs: dict[str, dict[str, Any]] = {}
    for t in todo:
        key = t["utility_key"]
        if key not in have and key not in jobs:
            jobs[key] = {**t["utility"], "key": key, "strength": t["strength"]}
    return list(jobs.values())
