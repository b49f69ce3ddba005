"""The command line: listings, one-line errors with exit code 2, run + report end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from defenda.cli import main

TINY_TOML = """
[study]
name = "cli"
seeds = [0]
rounds = 2
[task]
name = "digits"
[[attacks]]
name = "geiping"
iterations = 5
[[defenses]]
name = "none"
[[defenses]]
name = "gaussian-noise"
std = [0.1]
"""


def test_plugins_json_lists_builtins(capsys) -> None:
    assert main(["plugins", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    by_name = {d["name"]: d for d in data}
    assert by_name["attacks"]["status"] == "loaded" and by_name["attacks"]["builtin"]
    assert "geiping" in by_name["attacks"]["provides"]["attacks"]
    assert {"dist", "version", "module", "hooks", "error"} <= set(by_name["attacks"])


def test_attacks_and_defenses_list_parameters(capsys) -> None:
    assert main(["defenses"]) == 0
    out = capsys.readouterr().out
    assert "gaussian-noise" in out and "[strength, stronger when larger]" in out
    assert main(["attacks", "--json"]) == 0
    attacks = {a["name"]: a for a in json.loads(capsys.readouterr().out)}
    assert any(p["name"] == "iterations" and p["help"] for p in attacks["geiping"]["params"])


@pytest.mark.parametrize("content, expected", [
    ("[study\n", "not valid TOML"),
    ('[study]\nseeds = "a"\n[task]\nname="digits"\n[[attacks]]\nname="geiping"\n', "[study] key 'seeds'"),
    ('[task]\nname="digits"\n[[attacks]]\nname="nope"\n', "unknown attack 'nope'"),
])
def test_bad_study_is_one_line_exit_2(tmp_path: Path, capsys, content: str, expected: str) -> None:
    f = tmp_path / "s.toml"
    f.write_text(content)
    assert main(["run", str(f), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("defenda: error: ") and expected in err[0]
    assert "Traceback" not in "\n".join(err)


def test_unwritable_output_is_one_line(tmp_path: Path, capsys) -> None:
    f = tmp_path / "s.toml"
    f.write_text(TINY_TOML)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["run", str(f), "--out", str(blocker / "sub"), "--no-progress"]) == 2
    assert "not writable" in capsys.readouterr().err


def test_run_then_report_from_a_subprocess(tmp_path: Path) -> None:
    f = tmp_path / "s.toml"
    f.write_text(TINY_TOML)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "defenda.cli", "run", str(f), "--out", str(out), "--report", str(tmp_path / "rep")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "2 ok, 0 skipped, 0 errors" in done.stderr
    assert (tmp_path / "rep" / "index.md").exists()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert "2 already stored" in again.stderr
    assert main(["report", str(out)]) == 0
    assert (out / "report" / "index.md").exists()


def test_workers_accepts_auto_and_rejects_zero(capsys) -> None:
    import os

    from defenda.cli import build_parser

    args = build_parser().parse_args(["run", "--workers", "auto"])
    assert args.workers == len(os.sched_getaffinity(0)) >= 1
    assert build_parser().parse_args(["run", "--workers", "3"]).workers == 3
    for bad in ("0", "two"):
        with pytest.raises(SystemExit) as info:
            build_parser().parse_args(["run", "--workers", bad])
        assert info.value.code == 2
        assert "--workers" in capsys.readouterr().err


def test_an_interrupt_hidden_in_a_library_error_is_still_an_interrupt(monkeypatch, capsys) -> None:
    import sqlite3

    import defenda.cli as cli

    def dispatch(args):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise sqlite3.OperationalError("cannot rollback - no transaction is active") from None

    monkeypatch.setattr(cli, "_dispatch", dispatch)
    assert cli.main(["plugins"]) == 130
    assert "same command again to resume" in capsys.readouterr().err

    def other(args):
        raise ValueError("a real bug")

    monkeypatch.setattr(cli, "_dispatch", other)
    with pytest.raises(ValueError):
        cli.main(["plugins"])
