"""Per-process services of the harness: the task cache, the device, and which plugin is running.

A worker process keeps these between jobs: a task's data are loaded once per
process; ``STAGE`` is a buffer shared with the runner, naming the plugin now
running, so a job stopped for its time limit (or a dead worker) names the
plugin that hung.
"""

from __future__ import annotations

import json
from collections.abc import Callable
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


class StageError(Exception):
    """An exception raised inside a plugin, tagged with the plugin that raised it."""

    def __init__(self, plugin: str, exc: BaseException) -> None:
        super().__init__(f"{type(exc).__name__}: {exc}")
        self.plugin = plugin
        self.original = exc


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
