"""The study runner: expand the grid, skip what the store already has, run the rest, write rows.

Phase 1 measures utility once per (task, defense, strength, seed); phase 2
runs the attack trials and writes each row with that utility. Jobs run in
an executor (in-process, a local process pool, or Dask); only this process
writes the store, one committed transaction per row, so a crash loses at most
the jobs in flight and re-running the same command resumes.

Same study, same numbers: every job runs through :func:`pinned_job`, on
:data:`~defenda.harness.services.JOB_THREADS` threads (recorded in its row's
``extra["threads"]``) whatever the executor, the worker count and the machine, and seeds only
from the job itself (the trial and training code seed torch from the job's
seed; cached priors are functions of their cache keys). So an in-process run,
N workers, Dask and a killed-and-resumed run store the same rows.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Iterator
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

from defenda.harness.jobs import Trial, UtilityJob
from defenda.harness.services import JOB_THREADS, pinned_threads
from defenda.harness.store import Store
from defenda.harness.study import Study, check_against_data
from defenda.plugins import Plugins, get_plugins, set_plugins

#: (function, arguments, failure row builder): the builder makes the job's row when its worker
#: hangs past the time limit or dies (out of memory, segfault), so that trial still gets a row.
Job = tuple[Callable[..., Any], tuple[Any, ...], Callable[[str, str], Any]]


def pinned_job(threads: int, fn: Callable[..., Any], *args: Any) -> Any:
    """Run one job (a trial or a training run) on ``threads`` threads and record them in its row.

    In the job's own process, so it holds for every executor: the thread count a worker
    was started with (or Dask's) would otherwise decide the float summation order.
    """
    with pinned_threads(threads):
        out = fn(*args)
    row = out[0] if isinstance(out, tuple) else out  # a trial returns (row, arrays)
    row["extra"] = {**(row.get("extra") or {}), "threads": threads}
    return out


class InlineExecutor:
    """Runs jobs one after another in this process (``--workers 1``, no time or memory limit)."""

    def map_unordered(self, jobs: list[Job]) -> Iterator[Any]:
        for fn, args, _ in jobs:
            yield fn(*args)

    def close(self) -> None:
        pass


def _die_with_parent() -> None:
    """Linux: have the kernel kill this worker when the runner dies (e.g. SIGKILL), so no orphan
    keeps computing a trial nobody will store."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        except OSError:
            pass


def _worker_main(conn: Any, threads: int, memory_gb: float, stage: Any) -> None:
    """A worker process: run jobs sent over ``conn`` until told to stop."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _die_with_parent()
    if memory_gb > 0:
        import resource

        limit = int(memory_gb * 2**30)
        # RLIMIT_DATA bounds heap and anonymous mappings: a runaway allocation fails with
        # a MemoryError/RuntimeError inside the plugin (an error row) instead of taking the machine.
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    os.environ["DEFENDA_QUIET_PLUGINS"] = "1"  # the parent already reported plugin problems once
    import torch

    from defenda.harness import services
    from defenda.plugins import get_plugins

    torch.set_num_threads(threads)  # between jobs too (plugin import); each job pins its own (pinned_job)
    services.STAGE = stage
    get_plugins()  # load the plugins now, while the parent is still preparing the study
    while True:
        msg = conn.recv()
        if msg is None:
            return
        fn, args = msg
        conn.send(fn(*args))


class _Worker:
    def __init__(self, ctx: Any, threads: int, memory_gb: float) -> None:
        self.conn, child = ctx.Pipe()
        self.stage = ctx.Array("c", 160)
        self.process = ctx.Process(target=_worker_main, args=(child, threads, memory_gb, self.stage), daemon=True)
        self.process.start()
        child.close()
        self.job: Job | None = None
        self.started = 0.0

    def stage_name(self) -> str:
        return self.stage.value.decode(errors="replace") or "defenda"

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)
        self.conn.close()


class IsolatedExecutor:
    """Spawned worker processes (``--workers N``, or any time or memory limit).

    Each job runs in a long-lived worker; a worker that runs past ``timeout`` seconds
    or dies is killed and replaced, and its job gets an ``error`` row naming the
    plugin that was running. ``spawn``, not ``fork``: forking a process whose torch
    thread pool has run deadlocks the child.
    """

    def __init__(self, workers: int, *, timeout: float = 0, memory_gb: float = 0) -> None:
        import multiprocessing as mp

        self.ctx = mp.get_context("spawn")
        self.n, self.timeout, self.memory_gb = workers, timeout, memory_gb
        self.threads = JOB_THREADS
        self.workers: list[_Worker] = []

    def _spawn(self) -> _Worker:
        return _Worker(self.ctx, self.threads, self.memory_gb)

    def start(self, jobs: int) -> None:
        """Start the workers for ``jobs`` jobs now: their imports overlap the parent's preparation."""
        while len(self.workers) < min(self.n, jobs):
            self.workers.append(self._spawn())

    def map_unordered(self, jobs: list[Job]) -> Iterator[Any]:
        import time
        from multiprocessing.connection import wait

        pending = list(reversed(jobs))
        self.start(len(jobs))
        try:
            while pending or any(w.job for w in self.workers):
                for w in self.workers:
                    if w.job is None and pending:
                        w.job, w.started = pending.pop(), time.monotonic()
                        w.stage.value = b""
                        w.conn.send(w.job[:2])
                busy = [w for w in self.workers if w.job is not None]
                wait_s = None
                if self.timeout > 0:
                    wait_s = max(0.0, min(w.started + self.timeout for w in busy) - time.monotonic())
                ready = wait([w.conn for w in busy] + [w.process.sentinel for w in busy], timeout=wait_s)
                for w in busy:
                    if w.conn in ready:
                        try:
                            result = w.conn.recv()
                        except (EOFError, OSError):
                            yield self._replace(w, "worker process died (exit code "
                                                   f"{w.process.exitcode}; out of memory?)")
                            continue
                        w.job = None
                        yield result
                    elif w.process.sentinel in ready or not w.process.is_alive():
                        yield self._replace(w, f"worker process died (exit code {w.process.exitcode}; "
                                               "out of memory?)")
                    elif self.timeout > 0 and time.monotonic() - w.started > self.timeout:
                        yield self._replace(w, f"timed out after {self.timeout:g} s (study timeout)")
        except BaseException:
            self.close()  # Ctrl-C or a crash here: stop the workers, the store keeps what was written
            raise

    def _replace(self, w: _Worker, reason: str) -> Any:
        assert w.job is not None
        job, plugin = w.job, w.stage_name()
        w.kill()
        self.workers[self.workers.index(w)] = self._spawn()
        return job[2](reason, plugin)

    def close(self) -> None:
        # Kill, not a polite stop: an idle worker holds nothing (results went to the parent's
        # store, cache files are written atomically, a busy one is being abandoned anyway), and
        # an interpreter with torch loaded takes about a second to tear down.
        for w in self.workers:
            w.kill()
        self.workers = []


class DaskExecutor:
    """Runs the same jobs on a Dask distributed cluster (``--executor dask --scheduler ADDRESS``).

    A Dask worker with several threads still runs one job at a time (:func:`pinned_job` holds a
    process-wide lock): the thread count and torch's global RNG are per process. Use processes,
    ``threads_per_worker=1``, for parallelism.
    """

    def __init__(self, scheduler: str | Any | None) -> None:
        from dask.distributed import Client

        self.client = scheduler if isinstance(scheduler, Client) else Client(scheduler)
        self._own = not isinstance(scheduler, Client)

    def map_unordered(self, jobs: list[Job]) -> Iterator[Any]:
        from dask.distributed import as_completed as dask_completed

        futures = [self.client.submit(fn, *args, pure=False) for fn, args, _ in jobs]
        for fut in dask_completed(futures):
            yield fut.result()

    def close(self) -> None:
        if self._own:
            self.client.close()


def make_executor(workers: int = 1, executor: str = "local", scheduler: Any = None, *,
                  timeout: float = 0, memory_gb: float = 0) -> Any:
    """In-process for one worker without limits; isolated worker processes otherwise; or Dask."""
    if executor == "dask":
        return DaskExecutor(scheduler)
    if workers > 1 or timeout > 0 or memory_gb > 0:
        return IsolatedExecutor(workers, timeout=timeout, memory_gb=memory_gb)
    return InlineExecutor()


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
    from defenda.harness.trial import failed_trial, run_trial
    from defenda.harness.utility import failed_utility, run_utility

    plugins = plugins or get_plugins()
    limits = {"timeout": float(study.settings["timeout"]), "memory_gb": float(study.settings["memory_limit_gb"])}
    # the study's (a "threads" setting, when [study] has one) or JOB_THREADS: never the machine's
    threads = int(study.settings.get("threads") or JOB_THREADS)
    if executor == "local" and workers == 1:
        set_plugins(plugins)  # in-process trials use exactly these plugins
    pool = make_executor(workers, executor, scheduler, **limits)
    bar: Progress | None = None
    try:
        trials = study.trials()
        start = getattr(pool, "start", None)
        if start is not None:  # local workers import torch and the plugins while the data are checked
            start(len(trials))
        notices = check_against_data(study, plugins.registry)
        for notice in notices:
            print(f"defenda: {notice}", file=sys.stderr)
        trials = interleave(study.trials() if notices else trials)  # notices: optional tasks were dropped
        counts = {"ok": 0, "error": 0, "skipped": 0, "resumed": 0}
        with Store(out_dir) as store:
            if retry_errors:
                store.db.execute("DELETE FROM trials WHERE status='error'")
            done = store.done_keys()
            todo = [t for t in trials if t.key not in done]
            counts["resumed"] = len(trials) - len(todo)
            utility_jobs = _utility_jobs(todo, store)
            where = "dask" if executor == "dask" else f"{workers} worker{'s' if workers > 1 else ''}"
            bar = Progress(len(utility_jobs) + len(todo), progress, f"{study.name} ({where})")  # one bar for all
            ujobs = [(pinned_job, (threads, run_utility, job, device, str(out_dir)), partial(failed_utility, job))
                     for job in utility_jobs]
            for row in pool.map_unordered(ujobs):
                store.add_utility(row)
                bar.update(f"utility {row['defense']} acc={row.get('test_acc') or 0:.2f}")
            cache_dir = str(Path(out_dir) / "cache")
            # utility rows are final once written: read (and JSON-decode) each one once, not once per trial
            utility_of = lru_cache(maxsize=None)(store.utility)
            todo, lost = _runs_failed(todo, utility_of)
            for trial, row in lost:  # a federated trial whose training run failed has nothing to attack
                store.add_trial(row)
                counts["error"] += 1
                bar.update(f"{trial.attack}/{trial.defense} error")
            jobs = [(pinned_job, (threads, run_trial, dataclasses.replace(t, cache_dir=cache_dir,
                                                                          out_dir=str(out_dir)), device),
                     partial(failed_trial, t)) for t in todo]
            by_key = {t.key: t for t in todo}
            for row, arrays in pool.map_unordered(jobs):
                merge_utility(row, utility_of(row["utility_key"]) or {})
                store.add_trial(row, arrays)
                counts[row["status"]] += 1
                plugins.notify_trial_finished(by_key[row["key"]].to_dict(), row)
                bar.update(f"{row['attack']}/{row['defense']} {row['status']}")
    finally:
        pool.close()
        if bar is not None:
            bar.close()
    return counts


def merge_utility(row: dict[str, Any], util: dict[str, Any]) -> None:
    """The trial row gets its training run's utility and ε (and, in a federation, the attacked
    client's ε at the attacked round and where the noise sat relative to the observation)."""
    row["test_acc"], row["epsilon"] = util.get("test_acc"), util.get("epsilon")
    extra = util.get("extra") or {}
    if row.get("round") is None or not extra:
        return
    at = f"{row['round']}:{row.get('client')}"
    row["epsilon_round"] = (extra.get("epsilon_at") or {}).get(at)
    row["epsilon_release"] = (extra.get("epsilon_release_at") or {}).get(at)
    rero = (extra.get("rero_at") or {}).get(at)
    row["rero_bound"] = rero.get("bound") if rero else None
    dp = extra.get("dp") or {}
    row["extra"] = {**(row.get("extra") or {}), "dp_level": dp.get("level"), "delta": dp.get("delta"),
                    "accountant": dp.get("accountant"), "noise_position": extra.get("noise_position"),
                    "rero": rero}


def _runs_failed(todo: list[Trial], utility_of: Callable[[str], dict[str, Any] | None]
                 ) -> tuple[list[Trial], list[tuple[Trial, dict[str, Any]]]]:
    """Split federated trials whose training run failed off the list, each with its error row."""
    from defenda.harness.trial import failed_trial

    keep, lost = [], []
    for t in todo:
        util = utility_of(t.utility_key) if t.round is not None else None
        if util is not None and util.get("status") != "ok":
            row, _ = failed_trial(t, f"training run failed: {util.get('reason')}", "defenda")
            row["error_type"] = "TrainingRunFailed"
            merge_utility(row, util)
            lost.append((t, row))
        else:
            keep.append(t)
    return keep, lost


def interleave(trials: list[Trial]) -> list[Trial]:
    """The trials round-robin over (task, attack): parallel workers start on different attacks.

    An attack's first trial may train a prior (GIAS, GIML) that its other trials wait for;
    interleaving keeps the other workers busy with other attacks meanwhile, and the
    progress bar's ETA sees every attack early.
    """
    groups: dict[tuple[str, str], list[Trial]] = {}
    for t in trials:
        groups.setdefault((t.task, t.attack), []).append(t)
    out: list[Trial] = []
    queues = list(groups.values())
    for i in range(max((len(q) for q in queues), default=0)):
        out.extend(q[i] for q in queues if i < len(q))
    return out


def _utility_jobs(todo: list[Trial], store: Store) -> list[UtilityJob]:
    """One utility job per distinct key among the pending trials, minus those already stored."""
    have = store.done_keys("utility")
    jobs: dict[str, UtilityJob] = {}
    for t in todo:
        if t.utility_key not in have and t.utility_key not in jobs:
            jobs[t.utility_key] = t.utility
    return list(jobs.values())
