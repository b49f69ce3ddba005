"""The ``defenda`` command line.

``defenda run [STUDY.toml] [--out DIR] [--workers N]``, ``defenda report DIR``,
``defenda plugins [--json]``, ``defenda attacks``, ``defenda defenses``.
Errors a user can fix are printed as one line on stderr with exit code 2
(``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from defenda import __version__
from defenda.errors import DefendaError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="defenda", description="Privacy/utility trade-offs of FL defenses "
                                "against gradient-inversion attacks.")
    p.add_argument("--version", action="version", version=f"defenda {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a study (no file: the built-in default study)")
    run.add_argument("study", nargs="?", help="study TOML file, or a built-in study: default, paper "
                                              "(none: default)")
    run.add_argument("--out", default=None, help="output directory (default: runs/<study name>)")
    run.add_argument("--workers", type=_workers, default=1,
                     help="local worker processes, or 'auto': one per CPU core this process may use (default 1)")
    run.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1 or auto (default cpu)")
    run.add_argument("--executor", choices=("local", "dask"), default="local", help="where trials run")
    run.add_argument("--scheduler", default=None, help="Dask scheduler address (with --executor dask)")
    run.add_argument("--report", default=None, metavar="DIR", help="also write the report to DIR when done")
    run.add_argument("--retry-errors", action="store_true", help="run trials stored as errors again")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")

    rep = sub.add_parser("report", help="write the report of a results directory")
    rep.add_argument("dir", help="directory holding results.sqlite")
    rep.add_argument("--out", default=None, help="report directory (default: DIR/report)")
    rep.add_argument("--metric", default="psnr", help="leakage metric on the y axis (psnr, ssim, lpips, label_acc)")

    pl = sub.add_parser("plugins", help="list installed plugins")
    pl.add_argument("--json", action="store_true", help="machine-readable output")
    for kind in ("attacks", "defenses", "tasks", "metrics"):
        s = sub.add_parser(kind, help=f"list registered {kind} with their parameters")
        s.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def _workers(value: str) -> int:
    """``--workers``: a positive integer, or ``auto`` (the CPU cores this process may use)."""
    if value == "auto":
        import os

        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(_dispatch(args) or 0)
    except KeyboardInterrupt:
        return _interrupted()
    except DefendaError as exc:
        if args.debug:
            raise
        print(f"defenda: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        if not _caused_by_interrupt(exc):
            raise
        return _interrupted()  # a library turned Ctrl-C into its own exception while cleaning up


def _caused_by_interrupt(exc: BaseException) -> bool:
    """Whether a KeyboardInterrupt is in ``exc``'s chain of causes and contexts."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def _interrupted() -> int:
    print("defenda: interrupted; every finished trial is saved. Run the same command again to resume.",
          file=sys.stderr)
    return EXIT_INTERRUPTED


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "run":
        return _run(args)
    if args.command == "report":
        from defenda.harness.report import write_report

        index = write_report(args.dir, args.out, metric=args.metric)
        print(f"report written: {index}")
        return 0
    if args.command == "plugins":
        return _plugins(args)
    return _list(args.command[:-1], args.json)


def _run(args: argparse.Namespace) -> int:
    from defenda.harness.runner import run_study
    from defenda.harness.study import load_study, resolve_study
    from defenda.plugins import get_plugins

    plugins = get_plugins()
    study = load_study(resolve_study(args.study), plugins.registry)
    out = Path(args.out or Path("runs") / study.name)
    n = len(study.trials())
    print(f"defenda: study '{study.name}' ({n} trials) → {out}/results.sqlite", file=sys.stderr)
    counts = run_study(study, out, workers=args.workers, device=args.device, executor=args.executor,
                       scheduler=args.scheduler, progress=not args.no_progress, plugins=plugins,
                       retry_errors=args.retry_errors)
    print(f"defenda: {counts['ok']} ok, {counts['skipped']} skipped, {counts['error']} errors, "
          f"{counts['resumed']} already stored", file=sys.stderr)
    if args.report:
        from defenda.harness.report import write_report

        print(f"report written: {write_report(out, args.report)}", file=sys.stderr)
    return 0


def _plugins(args: argparse.Namespace) -> int:
    from defenda.plugins import get_plugins

    statuses = get_plugins().statuses
    if args.json:
        print(json.dumps([s.as_dict() for s in statuses], indent=2))
        return 0
    rows: list[tuple[str, ...]] = [("plugin", "distribution", "version", "status", "provides")]
    for s in statuses:
        provides = "; ".join(f"{k}: {', '.join(v)}" for k, v in s.provides.items()) or s.error
        rows.append((s.name, s.dist or "-", s.version or "-", s.status, provides))
    _table(rows)
    return 0


def _list(kind: str, as_json: bool) -> int:
    from defenda.params import describe
    from defenda.plugins import get_plugins

    entries = get_plugins().registry.entries(kind)
    data = []
    for e in entries:
        params = [{"name": p.name, "type": getattr(p.type, "__name__", str(p.type)), "default": p.default,
                   "help": p.help, **({"strength": p.strength} if p.strength else {})} for p in describe(e.cls.Params)]
        data.append({"name": e.name, "plugin": e.origin.plugin, "dist": e.origin.dist, "version": e.origin.version,
                     "summary": e.cls.summary(), "params": params,
                     **({"default_sweep": list(e.cls.default_sweep)} if kind == "defense" else {}),
                     **({"requires": _requires(e.cls)} if kind == "attack" else {})})
    if as_json:
        print(json.dumps(data, indent=2, default=str))
        return 0
    for d in data:
        print(f"{d['name']}  ({d['dist'] or d['plugin']} {d['version']})  {d['summary']}")
        if "requires" in d:
            print(f"    requires: {d['requires']}")
        if d.get("default_sweep"):
            print(f"    default sweep: {d['default_sweep']}")
        for p in d["params"]:
            mark = f" [strength, stronger when {'larger' if p['strength'] == 'up' else 'smaller'}]" \
                if p.get("strength") else ""
            print(f"    {p['name']} ({p['type']}, default {p['default']!r}){mark}: {p['help']}")
    return 0


def _requires(cls: type) -> str:
    r = cls.requires  # type: ignore[attr-defined]
    parts = [f"server={r.server}", f"updates={'/'.join(sorted(r.updates))}"]
    if r.knowledge:
        parts.append(f"knowledge={','.join(sorted(r.knowledge))}")
    return ", ".join(parts)


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


if __name__ == "__main__":
    sys.exit(main())
