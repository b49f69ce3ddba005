"""Shared fixtures: real (tiny) installed distributions for plugin-loading tests, small studies."""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import sys
import textwrap
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread for the test (attack modules: ``pytestmark = pytest.mark.usefixtures("one_thread")``).

    Small-model attacks are no faster with two threads, and their results depend on the
    thread count through float summation order.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _plugin_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts with no plugin switches set and a fresh process-wide plugin set."""
    from defenda import plugins

    for var in ("DEFENDA_STRICT_PLUGINS", "DEFENDA_DISABLE_PLUGINS", "DEFENDA_LOAD_PLUGINS", "DEFENDA_QUIET_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    plugins._REPORTED.clear()
    previous = plugins.set_plugins(None)
    yield
    plugins.set_plugins(previous)


@pytest.fixture
def make_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., list[md.EntryPoint]]:
    """Write a real distribution (dist-info with METADATA and entry_points.txt, plus its module)
    into a temporary site directory and return its ``defenda`` entry points."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))

    def make(dist: str, module: str, code: str, *, version: str = "0.1.0", ep_name: str | None = None,
             requires: tuple[str, ...] = ()) -> list[md.EntryPoint]:
        (site / f"{module}.py").write_text(textwrap.dedent(code))
        info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        meta = ["Metadata-Version: 2.1", f"Name: {dist}", f"Version: {version}"]
        meta += [f"Requires-Dist: {r}" for r in requires]
        (info / "METADATA").write_text("\n".join(meta) + "\n")
        (info / "entry_points.txt").write_text(f"[defenda]\n{ep_name or module} = {module}\n")
        sys.modules.pop(module, None)
        found = [d for d in md.distributions(path=[str(site)]) if d.metadata["Name"] == dist]
        return [ep for ep in found[0].entry_points if ep.group == "defenda"]

    return make


def builtin_entry_points() -> list[md.EntryPoint]:
    return list(md.entry_points(group="defenda"))


def load_benchmark(name: str) -> types.ModuleType:
    """``benchmarks/<name>.py`` imported as module ``name`` (benchmarks are scripts, not a package;
    tests reuse their victims and scoring)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses in the module look themselves up here
    spec.loader.exec_module(module)
    return module


TINY_STUDY = {
    "study": {"name": "tiny", "seeds": [0, 1], "rounds": 3, "client_batch_size": 8},
    "task": {"name": "digits", "model": "cnn"},
    "attacks": [{"name": "geiping", "iterations": 10}],
    "defenses": [{"name": "none"}, {"name": "gaussian-noise", "std": [0.01, 0.1]}],
}
