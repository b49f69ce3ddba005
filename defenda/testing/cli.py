"""End to end: run ``defenda`` in-process or in a subprocess, and check an installed plugin distribution."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata as md
import io
import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from defenda.testing.plugin_sets import _restore_env


@dataclasses.dataclass
class CliOutcome:
    """The result of one ``defenda`` command: exit code, stdout, stderr."""

    args: list[str]
    rc: int
    out: str
    err: str

    def _describe(self) -> str:
        return f"`defenda {' '.join(self.args)}` exited {self.rc}\n--- stdout ---\n{self.out}\n--- stderr ---\n{self.err}"

    def assert_success(self) -> CliOutcome:
        assert self.rc == 0, self._describe()
        return self

    def assert_failure(self, rc: int | None = None) -> CliOutcome:
        assert self.rc != 0 and (rc is None or self.rc == rc), self._describe()
        return self

    def assert_output_contains(self, *texts: str, stream: str = "out") -> CliOutcome:
        """Each text appears in ``stream``: ``"out"``, ``"err"`` or ``"any"``."""
        hay = {"out": self.out, "err": self.err, "any": self.out + self.err}[stream]
        for text in texts:
            assert text in hay, f"{text!r} not in {stream}\n{self._describe()}"
        return self

    def json(self) -> Any:
        """stdout parsed as JSON (for ``--json`` commands)."""
        return json.loads(self.out)


def run_cli(*args: str, env: Mapping[str, str] | None = None, subprocess_: bool = False,
            cwd: str | os.PathLike[str] | None = None, timeout: float = 600) -> CliOutcome:
    """Run ``defenda ARGS``.

    In-process by default: the command sees the process-wide plugins (those of
    :func:`registered` / the ``register_plugin`` fixture). With ``subprocess_=True``
    it runs ``python -m defenda.cli`` in a fresh interpreter that sees what is installed
    (``env`` is added to the environment, e.g. ``{"PYTHONPATH": target_dir}``).
    """
    argv = [str(a) for a in args]
    if subprocess_:
        full_env = {**os.environ, **(env or {})}
        if env and "PYTHONPATH" in env and os.environ.get("PYTHONPATH"):
            full_env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], os.environ["PYTHONPATH"]])
        proc = subprocess.run([sys.executable, "-m", "defenda.cli", *argv], capture_output=True, text=True,
                              env=full_env, cwd=cwd, timeout=timeout)
        return CliOutcome(argv, proc.returncode, proc.stdout, proc.stderr)
    from defenda.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = {k: os.environ.get(k) for k in (env or {})}
    old_cwd = os.getcwd()
    try:
        os.environ.update(env or {})
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(argv)
            except SystemExit as exc:  # argparse usage errors and --version
                rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    finally:
        os.chdir(old_cwd)
        _restore_env(saved)
    return CliOutcome(argv, int(rc), out.getvalue(), err.getvalue())


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def assert_installed(dist_name: str, provides: Mapping[str, Sequence[str]] | None = None, *,
                     path: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """Check that distribution ``dist_name`` is installed as a working defenda plugin.

    Its metadata declares entry points in the ``defenda`` group that resolve; a fresh
    ``defenda plugins --json`` lists each of them as ``loaded`` with this distribution and
    version; and they provide at least ``provides`` (e.g. ``{"defenses": ["soteria"]}``).
    ``path``: a directory the distribution was installed into with ``pip install --target``
    (added to the subprocess's ``PYTHONPATH``). Returns the plugins' ``--json`` entries.
    """
    if path is not None:
        dists = [d for d in md.distributions(path=[os.fspath(path)])
                 if _canonical(d.metadata["Name"] or "") == _canonical(dist_name)]
        assert dists, f"no distribution {dist_name!r} in {path}"
        dist = dists[0]
    else:
        try:
            dist = md.distribution(dist_name)
        except md.PackageNotFoundError:
            raise AssertionError(f"distribution {dist_name!r} is not installed") from None
    eps = [ep for ep in dist.entry_points if ep.group == "defenda"]
    assert eps, f"{dist_name} declares no entry point in the 'defenda' group ([project.entry-points.defenda])"
    env = {"PYTHONPATH": os.fspath(path)} if path is not None else {}
    outcome = run_cli("plugins", "--json", env=env, subprocess_=True).assert_success()
    listed = {p["name"]: p for p in outcome.json()}
    found = []
    for ep in eps:
        entry = listed.get(ep.name)
        assert entry is not None, f"plugin {ep.name!r} of {dist_name} is not listed by `defenda plugins`\n{outcome.err}"
        assert _canonical(entry["dist"]) == _canonical(dist_name) and entry["version"] == dist.version, entry
        assert entry["status"] == "loaded", f"plugin {ep.name!r} is {entry['status']}: {entry['error']}"
        found.append(entry)
    for kind, names in (provides or {}).items():
        have = {n for e in found for n in e["provides"].get(kind, [])}
        missing = set(names) - have
        assert not missing, f"{dist_name} does not provide {kind} {sorted(missing)} (it provides {sorted(have)})"
    return found
