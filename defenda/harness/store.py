"""The results store: ``DIR/results.sqlite``, one row per trial, each committed atomically.

SQLite in WAL mode with ``synchronous=FULL``: a killed study loses at most the
trial in flight, and re-running the same command resumes (trials are keyed by
a hash of their specification, so none is ever duplicated). One process
writes: a second ``defenda run`` on the same directory is refused while the
first holds the lock. Reconstructions of image trials are saved beside the
database as ``recon/<key>.npz`` (numpy, no pickle), written to a temporary
file and renamed, so a file either exists whole or not at all.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np

from defenda import __version__
from defenda.errors import StoreError

SCHEMA_VERSION = 1

METRIC_COLUMNS = ("psnr", "ssim", "lpips", "label_acc", "mse", "mae", "feature_acc",
                  # success rates: fractions of the batch's samples (see defenda.metrics.success)
                  "exact_rate", "recognised_rate", "ident_acc")
TRIAL_COLUMNS = (
    "key", "study", "task", "attack", "defense", "strength", "params", "batch_size", "seed",
    "status", "reason", "error_type", "plugin", *METRIC_COLUMNS, "test_acc", "epsilon",
    "attack_seconds", "trial_seconds", "server", "knowledge", "versions", "extra", "utility_key", "finished_at",
    # the federation (empty for the single-client protocol): the attacked round, the client (-1 for an
    # aggregate), the samples behind the update, the clients aggregated in it, the client's ε at that round
    "round", "client", "num_samples", "aggregation_size", "epsilon_round",
    # DP rows: ε of the attacked release alone, and the reconstruction-robustness bound on identification
    # success at the row's κ (defenda.federation.bounds); empty where no bound covers the row's adversary
    "epsilon_release", "rero_bound",
)
UTILITY_COLUMNS = ("key", "task", "defense", "strength", "params", "seed", "status", "reason", "test_acc",
                   "epsilon", "seconds", "finished_at", "extra")

_REAL = set(METRIC_COLUMNS) | {"strength", "test_acc", "epsilon", "attack_seconds", "trial_seconds", "seconds",
                               "epsilon_round", "epsilon_release", "rero_bound"}
_INT = {"batch_size", "seed", "round", "client", "num_samples", "aggregation_size"}


def _ddl(table: str, columns: tuple[str, ...]) -> str:
    def col(c: str) -> str:
        tp = "REAL" if c in _REAL else "INTEGER" if c in _INT else "TEXT"
        return f"{c} {tp}" + (" PRIMARY KEY" if c == "key" else "")

    return f"CREATE TABLE IF NOT EXISTS {table} ({', '.join(col(c) for c in columns)})"


class Store:
    """One output directory's results. Use as a context manager to hold the writer lock."""

    def __init__(self, out_dir: str | Path, *, write: bool = True) -> None:
        self.dir = Path(out_dir)
        self.write = write
        self._lock_fd: int | None = None
        if write:
            self._prepare_dir()
        elif not (self.dir / "results.sqlite").exists():
            raise StoreError(f"{self.dir}: no results.sqlite here; run a study first: defenda run --out {self.dir}")
        self.db = sqlite3.connect(self.dir / "results.sqlite", isolation_level=None, timeout=30)
        self.db.row_factory = sqlite3.Row
        if write:
            self._init_schema()
        self._check_version()

    # -- setup -------------------------------------------------------------------------
    def _prepare_dir(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise StoreError(f"{self.dir}: output directory is not writable ({exc.strerror}); "
                             f"choose another with --out") from None
        self._lock_fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._lock_fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(self._lock_fd)
            self._lock_fd = None
            raise StoreError(f"{self.dir}: another defenda run (pid {holder}) is writing here; "
                             f"wait for it to finish or use another --out") from None
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, str(os.getpid()).encode(), 0)

    def _init_schema(self) -> None:
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            self.db.execute(_ddl("trials", TRIAL_COLUMNS))
            self.db.execute(_ddl("utility", UTILITY_COLUMNS))
            self._add_missing_columns()
            self.db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            self.db.execute("INSERT OR IGNORE INTO meta VALUES ('created_by', ?)", (f"defenda {__version__}",))
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.dir / 'results.sqlite'}: not a usable results file ({exc}); "
                             f"move it away or choose another --out") from None

    def _add_missing_columns(self) -> None:
        """A store written before the federation columns existed gains them (empty for its rows)."""
        for table, columns in (("trials", TRIAL_COLUMNS), ("utility", UTILITY_COLUMNS)):
            have = {r[1] for r in self.db.execute(f"PRAGMA table_info({table})")}
            for c in columns:
                if c not in have:
                    tp = "REAL" if c in _REAL else "INTEGER" if c in _INT else "TEXT"
                    self.db.execute(f"ALTER TABLE {table} ADD COLUMN {c} {tp}")

    def _check_version(self) -> None:
        try:
            row = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.dir / 'results.sqlite'}: not a defenda results file ({exc}); "
                             f"choose another --out") from None
        if row is None or row[0] != str(SCHEMA_VERSION):
            found = row[0] if row else "none"
            raise StoreError(f"{self.dir / 'results.sqlite'}: results schema version {found}, this defenda "
                             f"{__version__} writes version {SCHEMA_VERSION}; use a new --out directory")

    def close(self) -> None:
        self.db.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- rows --------------------------------------------------------------------------
    def done_keys(self, table: str = "trials") -> set[str]:
        return {r[0] for r in self.db.execute(f"SELECT key FROM {table}")}

    def utility(self, key: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT * FROM utility WHERE key=?", (key,)).fetchone()
        if not row:
            return None
        out = dict(row)
        out["extra"] = json.loads(out["extra"]) if out.get("extra") else {}
        return out

    def utility_frame(self) -> Any:
        """All utility rows (one per training run) as a pandas DataFrame (JSON columns decoded)."""
        import pandas as pd

        df = pd.read_sql_query("SELECT * FROM utility ORDER BY rowid", self.db)
        for col in ("params", "extra"):
            if col in df:
                df[col] = df[col].map(lambda v: json.loads(v) if isinstance(v, str) and v else None)
        return df

    def _insert(self, table: str, columns: tuple[str, ...], row: dict[str, Any]) -> None:
        values = [_encode(row.get(c)) for c in columns]
        marks = ", ".join("?" for _ in columns)
        # One transaction per row: a crash leaves every earlier row intact and this one absent.
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.execute(f"INSERT OR IGNORE INTO {table} ({', '.join(columns)}) VALUES ({marks})", values)
            self.db.execute("COMMIT")
        except BaseException:
            # Ctrl-C can land after COMMIT; a ROLLBACK then would fail and hide the interrupt
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise

    def add_trial(self, row: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> None:
        """Store a finished trial (its reconstruction file first, so a row never points at nothing)."""
        if arrays:
            self.save_arrays(row["key"], arrays)
        self._insert("trials", TRIAL_COLUMNS, row)

    def add_utility(self, row: dict[str, Any]) -> None:
        self._insert("utility", UTILITY_COLUMNS, row)

    def save_arrays(self, key: str, arrays: dict[str, np.ndarray]) -> Path:
        folder = self.dir / "recon"
        folder.mkdir(exist_ok=True)
        if not key.isalnum():  # keys are hex digests; never let a name escape the directory
            raise StoreError(f"invalid trial key {key!r}")
        final = folder / f"{key}.npz"
        tmp = folder / f".{key}.tmp.npz"
        np.savez_compressed(tmp, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle
        os.replace(tmp, final)
        return final

    def load_arrays(self, key: str) -> dict[str, np.ndarray] | None:
        path = self.dir / "recon" / f"{key}.npz"
        if not key.isalnum() or not path.exists():
            return None
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}

    def dataframe(self) -> Any:
        """All trial rows as a pandas DataFrame (JSON columns decoded)."""
        import pandas as pd

        df = pd.read_sql_query("SELECT * FROM trials ORDER BY rowid", self.db)
        for col in ("params", "knowledge", "versions", "extra"):
            df[col] = df[col].map(lambda v: json.loads(v) if isinstance(v, str) and v else None)
        return df


def _encode(value: Any) -> Any:
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True, default=str)
    if isinstance(value, float) and not np.isfinite(value):
        return None if np.isnan(value) else value
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value
