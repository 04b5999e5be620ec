"""The results store: one SQLite file of trial records that survives a killed sweep.

Every ``log``/``log_many`` call is one transaction with ``INSERT OR IGNORE`` on ``trial_id``, so a
sweep killed at any instant leaves only whole calls behind, and a rerun that skips ``done_ids()``
completes it without storing a trial twice. The file uses WAL journaling: readers (a report, a
progress bar) do not block the writer.

Read rows through :meth:`ResultsLogger.records` rather than raw SQL: SQLite cannot store a float
NaN (it becomes NULL, which here means "not measured"), so a NaN measurement, common after an
exponent flip, is stored as the text ``'NaN'`` and converted back on reading.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import sqlite3
import typing
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from fxsdc.config import DTYPE_BITS, FAULT_MODELS, LOCATIONS, REFERENCES, ExperimentConfig
from fxsdc.errors import UserError
from fxsdc.schema import KINDS, OUTCOMES, TRIAL_FIELDS, TRIAL_SQL_COLUMNS, TrialRecord

log = logging.getLogger(__name__)

FORMAT = "fxsdc-results"
VERSION = "1"
_NAN = "NaN"
# Fields whose value may differ between two runs of the same trial without meaning the results
# differ (timings); merge_stores ignores them when it compares duplicates.
_UNCOMPARED = ("trial_id", "elapsed_s", "extra")
_HINTS = {
    name: hint for name, hint in typing.get_type_hints(TrialRecord).items() if name in TRIAL_FIELDS
}
_FIELDS = {f.name: f for f in dataclasses.fields(TrialRecord)}
_CHOICES: dict[str, tuple[str, ...]] = {
    "kind": KINDS,
    "outcome": OUTCOMES,
    "dtype": tuple(DTYPE_BITS),
    "reference": REFERENCES,
    "fault_model": FAULT_MODELS,
    "location": LOCATIONS,
}


def _base_type(name: str) -> tuple[type, bool]:
    """(int, float or str; whether None is allowed) for a TrialRecord field."""
    hint = _HINTS[name]
    args = typing.get_args(hint)
    if type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return hint, False


def _json_value(name: str, text: str, kind: type) -> Any:
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        value = None
    if not isinstance(value, kind):
        raise ValueError(f"field {name}={text!r} is not a JSON {kind.__name__}")
    return value


def validate_record(record: TrialRecord) -> dict[str, Any]:
    """Check ``record`` against the schema and return its row as SQLite values.

    Raises ValueError naming the trial and the field: a malformed row is a bug in the producer,
    and writing it would poison every report built from the store.
    """
    row = record.to_row()
    try:
        for name, value in row.items():
            kind, optional = _base_type(name)
            if value is None:
                if not optional or name == "outcome":  # a stored trial always has an outcome
                    raise ValueError(f"field {name} is required")
                continue
            if kind is int and isinstance(value, bool):
                value = int(value)
            elif kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind):
                raise ValueError(f"field {name}={value!r} is not {kind.__name__}")
            if kind is float and math.isnan(value):
                value = _NAN
            if name in _CHOICES and value not in _CHOICES[name]:
                raise ValueError(
                    f"field {name}={value!r} is not one of {', '.join(_CHOICES[name])}"
                )
            row[name] = value
        for name in ("trial_id", "config_id", "exp_name", "model", "dataset"):
            if not row[name]:
                raise ValueError(f"field {name} is empty")
        width = DTYPE_BITS[row["dtype"]]
        if row["bit"] is not None and not 0 <= row["bit"] < width:
            raise ValueError(f"field bit={row['bit']} is outside 0..{width - 1} for {row['dtype']}")
        if row["detected"] not in (0, 1):
            raise ValueError(f"field detected={row['detected']!r} is not 0 or 1")
        flags = _json_value("detected_by", row["detected_by"], dict)
        if any(v not in (0, 1) or isinstance(v, bool) for v in flags.values()):
            raise ValueError(f"field detected_by={row['detected_by']!r} has values other than 0/1")
        if row["detected"] != int(any(flags.values())):
            raise ValueError(
                f"field detected={row['detected']} disagrees with detected_by={row['detected_by']}"
            )
        _json_value("extra", row["extra"], dict)
        for name in ("bits", "index"):
            if row[name] is not None:
                _json_value(name, row[name], list)
    except ValueError as e:
        raise ValueError(f"invalid trial record {record.trial_id!r}: {e}") from None
    return row


def _from_sql(row: dict[str, Any]) -> TrialRecord:
    for name, value in row.items():
        if value == _NAN and name in _HINTS and _base_type(name)[0] is float:
            row[name] = math.nan
    return TrialRecord.from_row(row)


def _q(name: str) -> str:
    """Quote a column name: the schema has ``index``, an SQL keyword."""
    return f'"{name}"'


_COLUMNS = ", ".join(_q(n) for n in TRIAL_FIELDS)


def _column_sql(name: str, sql_type: str) -> str:
    f = _FIELDS[name]
    decl = f"{_q(name)} {sql_type}"
    if name == "trial_id":
        return decl + " PRIMARY KEY"
    if not _base_type(name)[1]:
        decl += " NOT NULL"
    if f.default is not dataclasses.MISSING and f.default is not None:
        default = f.default
        decl += " DEFAULT " + (
            "'" + default.replace("'", "''") + "'" if isinstance(default, str) else repr(default)
        )
    return decl


_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS trials ("
    + ", ".join(_column_sql(n, t) for n, t in TRIAL_SQL_COLUMNS)
    + ")",
    "CREATE INDEX IF NOT EXISTS trials_config ON trials (config_id)",
    "CREATE TABLE IF NOT EXISTS configs "
    "(config_id TEXT PRIMARY KEY, exp_name TEXT NOT NULL, config TEXT NOT NULL)",
]
_INSERT = f"INSERT OR IGNORE INTO trials ({_COLUMNS}) VALUES ({', '.join('?' * len(TRIAL_FIELDS))})"


class ResultsLogger:
    """Append-only store of :class:`~fxsdc.schema.TrialRecord` rows in one SQLite file.

    ``create=False`` refuses a missing file. ``readonly=True`` (implies ``create=False``) never
    modifies the file, for readers such as the report. Opening a file that is not a results store
    raises UserError and leaves the file untouched.
    """

    def __init__(
        self, path: str | os.PathLike[str], create: bool = True, readonly: bool = False
    ) -> None:
        self.path = Path(path)
        if (readonly or not create) and not self.path.is_file():
            raise UserError(f"{self.path}: no such results store")
        try:
            if readonly:
                self._conn = sqlite3.connect(self.path.resolve().as_uri() + "?mode=ro", uri=True)
            else:
                self._conn = sqlite3.connect(self.path, timeout=30.0)
        except sqlite3.Error as e:
            raise UserError(f"{self.path}: cannot open results store: {e}") from e
        self._conn.row_factory = sqlite3.Row
        try:
            self._check_or_create(create and not readonly)
            if readonly:
                self._require_columns()
            else:
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._add_missing_columns()
        except BaseException:
            self._conn.close()
            raise

    def _check_or_create(self, create: bool) -> None:
        not_store = UserError(f"{self.path} is not an fxsdc results store")
        try:
            tables = {
                r[0]
                for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
        except sqlite3.OperationalError as e:  # a directory, a missing parent, no permission
            raise UserError(f"{self.path}: cannot open results store: {e}") from e
        except sqlite3.DatabaseError as e:  # "file is not a database"
            raise not_store from e
        if not tables:
            if not create:
                raise not_store
            with self._conn:  # one transaction: a crash here leaves an empty file, not half a store
                self._conn.execute("BEGIN IMMEDIATE")
                for statement in _SCHEMA:
                    self._conn.execute(statement)
                self._conn.executemany(
                    "INSERT OR IGNORE INTO meta VALUES (?, ?)",
                    [("format", FORMAT), ("version", VERSION)],
                )
            return
        if "meta" not in tables:
            raise not_store
        meta = dict(self._conn.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("format") != FORMAT or "trials" not in tables:
            raise not_store
        if meta.get("version") != VERSION:
            raise UserError(
                f"{self.path} is an fxsdc results store of version {meta.get('version')}; "
                f"this fxsdc reads version {VERSION}"
            )

    def _missing_columns(self) -> list[tuple[str, str]]:
        present = {r["name"] for r in self._conn.execute("PRAGMA table_info(trials)")}
        return [(n, t) for n, t in TRIAL_SQL_COLUMNS if n not in present]

    def _require_columns(self) -> None:
        missing = [n for n, _ in self._missing_columns()]
        if missing:
            raise UserError(
                f"{self.path}: results store lacks columns {', '.join(missing)} "
                "(open it writable once to add them)"
            )

    def _add_missing_columns(self) -> None:
        """Add columns that the schema gained after this store was written (with their defaults)."""
        missing = self._missing_columns()
        if not missing:
            return
        for name, _ in missing:
            f = _FIELDS[name]
            if f.default is dataclasses.MISSING and not _base_type(name)[1]:
                raise UserError(f"{self.path}: results store lacks required column {name}")
        with self._conn:
            for name, sql_type in missing:
                self._conn.execute(f"ALTER TABLE trials ADD COLUMN {_column_sql(name, sql_type)}")

    # -- writing ----------------------------------------------------------------------------
    def log(self, record: TrialRecord) -> bool:
        """Store one trial; False if a trial with this id was already stored."""
        return self.log_many([record]) == 1

    def log_many(self, records: Iterable[TrialRecord]) -> int:
        """Store trials in one transaction (all validated first); returns how many were new."""
        rows = [validate_record(r) for r in records]
        before = self._conn.total_changes
        with self._conn:
            self._conn.executemany(_INSERT, [tuple(row[n] for n in TRIAL_FIELDS) for row in rows])
        return self._conn.total_changes - before

    def save_config(self, config: ExperimentConfig | dict[str, Any]) -> str:
        """Record what a trial's config_id stands for; returns the config_id."""
        if isinstance(config, dict):
            config = ExperimentConfig.from_dict(config)
        with self._conn:
            self._conn.execute(
                "INSERT OR IGNORE INTO configs VALUES (?, ?, ?)",
                (config.config_id, config.exp_name, json.dumps(config.to_dict())),
            )
        return config.config_id

    # -- reading ----------------------------------------------------------------------------
    def done_ids(self) -> set[str]:
        return {r[0] for r in self._conn.execute("SELECT trial_id FROM trials")}

    def has(self, trial_id: str) -> bool:
        return (
            self._conn.execute("SELECT 1 FROM trials WHERE trial_id = ?", (trial_id,)).fetchone()
            is not None
        )

    def count(self) -> int:
        return self._conn.execute("SELECT COUNT(*) FROM trials").fetchone()[0]

    def iter_records(self) -> Iterator[TrialRecord]:
        """Trials in the order they were stored, without holding them all in memory."""
        for row in self._conn.execute(f"SELECT {_COLUMNS} FROM trials ORDER BY rowid"):
            yield _from_sql(dict(row))

    def records(self) -> list[TrialRecord]:
        return list(self.iter_records())

    def configs(self) -> dict[str, dict[str, Any]]:
        """config_id -> the config's fields, for every config saved with save_config."""
        rows = self._conn.execute("SELECT config_id, config FROM configs ORDER BY rowid")
        return {r[0]: json.loads(r[1]) for r in rows}

    # -- export -----------------------------------------------------------------------------
    def export_csv(self, path: str | os.PathLike[str]) -> int:
        """Write every trial as CSV (header: schema fields; empty cell: null); returns the count."""

        def write(f: typing.TextIO) -> int:
            writer = csv.writer(f)
            writer.writerow(TRIAL_FIELDS)
            n = 0
            for record in self.iter_records():
                writer.writerow(["" if v is None else v for v in record.to_row().values()])
                n += 1
            return n

        return _write_atomic(Path(path), write)

    def export_jsonl(self, path: str | os.PathLike[str]) -> int:
        """Write every trial as one JSON object per line (NaN/Infinity as Python's json writes)."""

        def write(f: typing.TextIO) -> int:
            n = 0
            for record in self.iter_records():
                f.write(json.dumps(record.to_row()) + "\n")
                n += 1
            return n

        return _write_atomic(Path(path), write)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> "ResultsLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _write_atomic(path: Path, write: typing.Callable[[typing.TextIO], int]) -> int:
    """Write through a temporary file so a reader never sees a half-written export."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            n = write(f)
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"{path}: cannot write export: {e.strerror or e}") from e
    return n


def read_export(path: str | os.PathLike[str]) -> list[TrialRecord]:
    """Read a ``.csv`` or ``.jsonl`` file written by export_csv/export_jsonl back into records."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8", newline="") as f:
            if path.suffix == ".jsonl":
                return [TrialRecord.from_row(json.loads(line)) for line in f if line.strip()]
            if path.suffix == ".csv":
                return [_from_csv(row) for row in csv.DictReader(f)]
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise UserError(f"{path}: cannot read export: {type(e).__name__}: {e}") from e
    raise UserError(f"{path}: an export ends in .csv or .jsonl")


def _from_csv(row: dict[str, str]) -> TrialRecord:
    values: dict[str, Any] = {}
    for name in TRIAL_FIELDS:
        text = row[name]
        kind, optional = _base_type(name)
        values[name] = None if text == "" and optional else kind(text)
    return TrialRecord(**values)


# -- shards ---------------------------------------------------------------------------------
def shard_of(trial_id: str, num_shards: int) -> int:
    """The shard (0..num_shards-1) that owns ``trial_id``; stable across processes and machines.

    Any stable key works: a runner that keeps a forward pass's trials together may pass its
    pass key instead of a trial id.
    """
    if num_shards < 1:
        raise UserError(f"number of shards must be >= 1, not {num_shards}")
    return int(hashlib.sha256(trial_id.encode()).hexdigest()[:16], 16) % num_shards


_SHARD_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N."""
    m = _SHARD_RE.match(text)
    if not m:
        raise UserError(f"shard {text!r} is not of the form I/N (e.g. 0/4)")
    index, count = int(m.group(1)), int(m.group(2))
    if count < 1 or index >= count:
        raise UserError(f"shard {text!r}: need N >= 1 and 0 <= I < N")
    return index, count


def shard_from_env(environ: typing.Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """(RANK, WORLD_SIZE) as set by torchrun, or None when neither is set."""
    env = os.environ if environ is None else environ
    rank, world = env.get("RANK"), env.get("WORLD_SIZE")
    if rank is None and world is None:
        return None
    if rank is None or world is None:
        raise UserError("RANK and WORLD_SIZE must be set together (as torchrun does)")
    try:
        return parse_shard(f"{rank}/{world}")
    except UserError:
        raise UserError(f"RANK={rank!r} WORLD_SIZE={world!r} is not a valid shard") from None


# -- merging --------------------------------------------------------------------------------
def merge_stores(
    inputs: list[str | os.PathLike[str]], output: str | os.PathLike[str]
) -> tuple[int, int]:
    """Combine stores into a new store; returns (rows read, rows written).

    A trial present in several inputs is kept once. If two copies differ in anything but timings
    (``elapsed_s``, ``extra``), the merge is refused: trial ids are deterministic, so differing
    results mean the inputs came from different code, data or hardware, and silently picking one
    would hide that. The output is written to ``<output>.partial`` and renamed at the end, so a
    failed merge leaves no output.
    """
    out_path = Path(output)
    if not inputs:
        raise UserError("merge needs at least one input store")
    if out_path.exists():
        raise UserError(f"{out_path} exists; merge writes a new store")
    n_in = 0
    for p in inputs:
        with ResultsLogger(p, create=False) as store:
            n_in += store.count()
    partial = out_path.with_name(out_path.name + ".partial")
    for leftover in (partial, Path(f"{partial}-wal"), Path(f"{partial}-shm")):
        leftover.unlink(missing_ok=True)
    compared = [n for n in TRIAL_FIELDS if n not in _UNCOMPARED]
    differs = " OR ".join(f"s.{_q(n)} IS NOT m.{_q(n)}" for n in compared)
    try:
        with ResultsLogger(partial) as out:
            conn = out._conn
            for p in inputs:
                conn.execute("ATTACH DATABASE ? AS src", (str(p),))
                try:
                    clash = conn.execute(
                        "SELECT s.trial_id FROM src.trials s JOIN main.trials m USING (trial_id) "
                        f"WHERE {differs} LIMIT 1"
                    ).fetchone()
                    if clash:
                        raise UserError(
                            f"{p}: trial {clash[0]} is already in an earlier input "
                            "with different results; "
                            "refusing to merge"
                        )
                    with conn:
                        conn.execute(
                            f"INSERT OR IGNORE INTO main.trials ({_COLUMNS}) "
                            f"SELECT {_COLUMNS} FROM src.trials ORDER BY rowid"
                        )
                        conn.execute(
                            "INSERT OR IGNORE INTO main.configs (config_id, exp_name, config) "
                            "SELECT config_id, exp_name, config FROM src.configs ORDER BY rowid"
                        )
                finally:
                    conn.execute("DETACH DATABASE src")
            n_out = out.count()
            conn.execute("PRAGMA journal_mode=DELETE")  # one self-contained file to rename
        os.replace(partial, out_path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    log.info("merged %d rows from %d stores into %s: %d trials", n_in, len(inputs), out_path, n_out)
    return n_in, n_out
