"""Per-process services of the harness: the task cache, the device, which plugin is running, the threads.

A worker process keeps these between jobs: a task's data are loaded once per
process; ``STAGE`` is a buffer shared with the runner, naming the plugin now
running, so a job stopped for its time limit (or a dead worker) names the
plugin that hung. :func:`pinned_threads` runs each job on :data:`JOB_THREADS`
threads whatever the executor and worker count, because the thread count
changes the order of float sums and so the numbers.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

from defenda.compose import component_names
from defenda.errors import UnsupportedError
from defenda.interfaces import Task
from defenda.records import TaskData
from defenda.registry import Registry

T = TypeVar("T")

_TASKS: dict[str, tuple[Task, TaskData]] = {}
#: set by an isolated worker (see :mod:`defenda.harness.runner`): a shared ``ctypes`` char array
STAGE: Any = None
#: torch and BLAS threads of every job (trial or training run), recorded in each row's ``extra["threads"]``.
#: One, not "the cores / workers": a number that depends on the machine or ``--workers`` would make the
#: study's numbers depend on them; the small models of a study gain little from more threads per job,
#: and ``--workers auto`` uses the cores instead.
JOB_THREADS = 1
#: one job at a time per process: the thread count and torch's global RNG (seeded by each trial) are
#: process-wide, so two jobs in threads of one process (a Dask worker with ``nthreads > 1``) would mix them
_JOB_LOCK = threading.Lock()


class StageError(Exception):
    """An exception raised inside a plugin, tagged with the plugin that raised it."""

    def __init__(self, plugin: str, exc: BaseException) -> None:
        super().__init__(f"{type(exc).__name__}: {exc}")
        self.plugin = plugin
        self.original = exc


@contextlib.contextmanager
def pinned_threads(threads: int = JOB_THREADS) -> Iterator[None]:
    """Run the body alone in this process on ``threads`` torch and BLAS threads; restore the counts after.

    BLAS (numpy's and scipy's OpenBLAS, used by e.g. Stein's decomposition) keeps its own pool,
    which ``torch.set_num_threads`` does not reach; ``threadpoolctl`` (a scikit-learn dependency)
    limits it. scipy's BLAS is loaded first so that a job that imports it later is limited too.
    """
    with _JOB_LOCK:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with _blas_limited(threads):
                yield
        finally:
            torch.set_num_threads(previous)


def _blas_limited(threads: int) -> contextlib.AbstractContextManager[Any]:
    try:
        import scipy.linalg  # noqa: F401  (loads scipy's own OpenBLAS, so the limit below covers it)
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - both come with scikit-learn, a dependency
        return contextlib.nullcontext()
    return threadpool_limits(limits=threads, user_api="blas")


def resolve_device(device: str) -> torch.device:
    """'auto' → the GPU when one is present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_task(registry: Registry, name: str, params: dict[str, Any]) -> tuple[Task, TaskData]:
    """The task and its data, loaded once per process."""
    key = json.dumps([name, params], sort_keys=True)
    if key not in _TASKS:
        task = registry.get("task", name).cls(params)
        _TASKS[key] = (task, task.load())
    return _TASKS[key]


def defense_plugin(registry: Registry, name: str) -> str:
    """The plugin(s) behind a (possibly composed) defense, for error rows."""
    return "+".join(sorted({registry.get("defense", n).origin.plugin for n in component_names(name)}))


def in_plugin(plugin: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call plugin code; an exception it raises becomes a :class:`StageError` naming ``plugin``."""
    if STAGE is not None:
        STAGE.value = plugin.encode()[:150]
    try:
        return fn(*args, **kwargs)
    except (UnsupportedError, StageError):
        raise
    except Exception as exc:
        raise StageError(plugin, exc) from exc
