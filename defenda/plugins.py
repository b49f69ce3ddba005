"""Plugin manager: load each entry point of the ``defenda`` group on its own.

One broken plugin is reported once on stderr (plugin, distribution, version,
a one-line reason, what to do, how to see the traceback) and skipped; the
others load. Environment switches:

* ``DEFENDA_STRICT_PLUGINS=1`` — any plugin problem is an error (use in CI).
* ``DEFENDA_DISABLE_PLUGINS=a,b`` — skip these plugins (entry-point names).
* ``DEFENDA_LOAD_PLUGINS=a,b`` — load only these (empty string: none).

Built-ins (``defenda_attacks``, ``defenda_defenses``, …) come through the
same entry-point group as third-party packages; the core never imports them.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata as md
import os
import sys
import traceback
from collections.abc import Iterable
from typing import Any

import pluggy

from defenda import __version__, hookspecs
from defenda.errors import PluginError
from defenda.registry import KINDS, Origin, Registry

GROUP = "defenda"
BUILTIN_DIST = "defenda"
_REPORTED: set[str] = set()


@dataclasses.dataclass
class PluginStatus:
    """One plugin as ``defenda plugins`` shows it."""

    name: str
    dist: str
    version: str
    module: str
    status: str  # loaded | failed | incompatible | blocked
    error: str = ""
    provides: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    hooks: list[str] = dataclasses.field(default_factory=list)
    traceback: str = ""

    @property
    def builtin(self) -> bool:
        return self.dist == BUILTIN_DIST

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("traceback")
        d["builtin"] = self.builtin
        return d


@dataclasses.dataclass
class Plugins:
    """The loaded plugin manager, the registry it filled and every plugin's status."""

    pm: pluggy.PluginManager
    registry: Registry
    statuses: list[PluginStatus]

    def status(self, name: str) -> PluginStatus:
        return next(s for s in self.statuses if s.name == name)

    def versions(self) -> dict[str, str]:
        """``{distribution: version}`` of the loaded plugins (stored with every result row)."""
        return {s.dist or s.name: s.version for s in self.statuses if s.status == "loaded"}

    def notify_trial_finished(self, trial: dict[str, Any], result: dict[str, Any]) -> None:
        """Call the observer hook; an observer's exception is reported once and ignored."""
        for impl in self.pm.hook.defenda_trial_finished.get_hookimpls():
            try:
                impl.function(trial=trial, result=result)
            except Exception as exc:  # an observer must never stop a study
                _report(f"defenda: plugin '{impl.plugin_name}' failed in defenda_trial_finished: "
                        f"{_one_line(exc)} (ignored)")


def _env_list(var: str) -> set[str] | None:
    raw = os.environ.get(var)
    if raw is None:
        return None
    return {p.strip() for p in raw.split(",") if p.strip()}


def _strict() -> bool:
    return os.environ.get("DEFENDA_STRICT_PLUGINS", "").lower() in {"1", "true", "yes"}


def _one_line(exc: BaseException) -> str:
    msg = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if isinstance(exc, pluggy.PluginValidationError) and len(msg) > 1:
        # pluggy puts the reason (e.g. "Argument(s) {'device'} ...") on the last line
        return f"{msg[0]}: {msg[-1]}"
    return f"{type(exc).__name__}: {msg[0] if msg else ''}".rstrip(": ")


def _report(message: str) -> None:
    """Print a plugin problem once per process on stderr (never on stdout: keeps --json clean)."""
    if message in _REPORTED or os.environ.get("DEFENDA_QUIET_PLUGINS"):
        return
    _REPORTED.add(message)
    print(message, file=sys.stderr)


def _dist_of(ep: md.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "", ""
    return dist.metadata["Name"] or "", dist.version or ""


def _requires_defenda(ep: md.EntryPoint) -> str | None:
    """The plugin's declared ``defenda`` requirement when this defenda does not satisfy it."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.version import Version

    dist = getattr(ep, "dist", None)
    if dist is None or (dist.metadata["Name"] or "").lower() == BUILTIN_DIST:
        return None
    for raw in dist.requires or []:
        try:
            req = Requirement(raw)
        except InvalidRequirement:
            continue
        if req.name.lower() == "defenda" and not (req.marker and not req.marker.evaluate()):
            if req.specifier and not req.specifier.contains(Version(__version__), prereleases=True):
                return str(req)
    return None


def _sorted_entry_points(eps: Iterable[md.EntryPoint]) -> list[md.EntryPoint]:
    # Built-ins first, then third-party sorted by (distribution, name): the same order on every machine.
    def key(ep: md.EntryPoint) -> tuple[int, str, str]:
        dist, _ = _dist_of(ep)
        return (0 if dist.lower() == BUILTIN_DIST else 1, dist.lower(), ep.name)

    unique = {(ep.name, ep.value): ep for ep in eps}
    return sorted(unique.values(), key=key)


class _Loader:
    """One load of all plugins into a fresh manager and registry."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.registry = Registry()
        self.statuses: list[PluginStatus] = []

    def fail(self, st: PluginStatus, status: str, reason: str, advice: str, exc: BaseException | None) -> None:
        st.status, st.error = status, reason
        st.traceback = traceback.format_exc() if exc else ""
        what = {"failed": "could not be loaded", "incompatible": "is incompatible with defenda " + __version__}[status]
        who = f"plugin '{st.name}'" + (f" ({st.dist} {st.version})" if st.dist else "")
        msg = (f"defenda: {who} {what} and was skipped: {reason}. {advice} "
               f"Skip it: DEFENDA_DISABLE_PLUGINS={st.name}. Full traceback: DEFENDA_STRICT_PLUGINS=1")
        if _strict():
            raise PluginError(msg) from exc
        _report(msg)

    def add(self, name: str, obj: Any, dist: str, version: str, module: str) -> PluginStatus:
        st = PluginStatus(name=name, dist=dist, version=version, module=module, status="loaded")
        self.statuses.append(st)
        try:
            self.pm.register(obj, name=name)
        except Exception as exc:  # PluginValidationError or a duplicate name
            if self.pm.get_plugin(name) is not None:
                self.pm.unregister(name=name)
            self.fail(st, "incompatible", _one_line(exc), "Upgrade the plugin or defenda.", exc)
        return st

    def check_pending(self) -> None:
        # Catches hook names that match no spec (typos such as defenda_register_defences).
        while True:
            try:
                self.pm.check_pending()
                return
            except pluggy.PluginValidationError as exc:
                name = self.pm.get_name(exc.plugin) or ""
                self.pm.unregister(plugin=exc.plugin)
                st = next(s for s in self.statuses if s.name == name)
                self.fail(st, "incompatible", _one_line(exc), "Fix the hook name (see defenda/hookspecs.py).", exc)

    def register_all(self) -> None:
        """Call each registration hook one plugin at a time, so errors name the plugin."""
        for st in self.statuses:
            if st.status != "loaded":
                continue
            plugin = self.pm.get_plugin(st.name)
            st.hooks = sorted(h.name for h in self.pm.get_hookcallers(plugin) or [])
            origin = Origin(st.name, st.dist, st.version)
            try:
                for kind in KINDS:
                    hook_name = f"defenda_register_{kind}s"
                    others = [p for p in self.pm.get_plugins() if p is not plugin]
                    caller = self.pm.subset_hook_caller(hook_name, remove_plugins=others)
                    caller(register=lambda cls, _k=kind, _o=origin: self.registry.register(_k, cls, _o))
            except Exception as exc:
                self.registry.drop_plugin(st.name)
                self.pm.unregister(plugin=plugin)
                self.fail(st, "failed", _one_line(exc), "Report this to the plugin's author.", exc)
                continue
            st.provides = self.registry.by_plugin(st.name)


def load_plugins(
    *,
    entry_points: Iterable[md.EntryPoint] | None = None,
    extra: Iterable[tuple[str, Any]] = (),
) -> Plugins:
    """Load every plugin of the ``defenda`` entry-point group into a fresh manager.

    :param entry_points: override the installed entry points (tests).
    :param extra: ``(name, module_or_object)`` pairs registered after the entry
        points, as if they were installed (the ``defenda.testing`` helpers use this).
    :raises PluginError: in strict mode, on the first plugin problem.
    """
    only = _env_list("DEFENDA_LOAD_PLUGINS")
    disabled = _env_list("DEFENDA_DISABLE_PLUGINS") or set()
    eps = md.entry_points(group=GROUP) if entry_points is None else entry_points
    loader = _Loader()
    for ep in _sorted_entry_points(eps):
        dist, version = _dist_of(ep)
        if ep.name in disabled or (only is not None and ep.name not in only):
            loader.statuses.append(PluginStatus(ep.name, dist, version, ep.value, "blocked"))
            continue
        needed = _requires_defenda(ep)
        if needed:
            st = PluginStatus(ep.name, dist, version, ep.value, "loaded")
            loader.statuses.append(st)
            loader.fail(st, "incompatible", f"it requires {needed} (from its package metadata)",
                        f"Upgrade it: pip install -U {dist or ep.name}.", None)
            continue
        try:
            obj = ep.load()
        except Exception as exc:
            st = PluginStatus(ep.name, dist, version, ep.value, "loaded")
            loader.statuses.append(st)
            loader.fail(st, "failed", f"import failed: {_one_line(exc)}",
                        f"Reinstall or upgrade it: pip install -U {dist or ep.name}.", exc)
            continue
        loader.add(ep.name, obj, dist, version, ep.value)
    for name, obj in extra:
        loader.add(name, obj, "", "", getattr(obj, "__name__", repr(obj)))
    loader.check_pending()
    loader.register_all()
    return Plugins(loader.pm, loader.registry, loader.statuses)


_CACHED: Plugins | None = None


def get_plugins(*, reload: bool = False) -> Plugins:
    """The process-wide plugins, loaded on first use."""
    global _CACHED
    if _CACHED is None or reload:
        _CACHED = load_plugins()
    return _CACHED


def set_plugins(plugins: Plugins | None) -> Plugins | None:
    """Make ``plugins`` the process-wide set (None: reload on next use); returns the previous one.

    The runner does this for in-process execution so that plugins registered with
    ``load_plugins(extra=...)`` (tests, notebooks) are the ones trials use.
    """
    global _CACHED
    previous, _CACHED = _CACHED, plugins
    return previous
