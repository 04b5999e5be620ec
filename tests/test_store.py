"""ResultsLogger: validation, exports, crash resume with a real SIGKILL, shards and merging."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fxsdc.config import ExperimentConfig
from fxsdc.errors import UserError
from fxsdc.schema import TRIAL_FIELDS, TrialRecord
from fxsdc.store import (
    ResultsLogger,
    merge_stores,
    parse_shard,
    read_export,
    shard_from_env,
    shard_of,
)
from tests.fake_sweep import fake_record, run

FAKE_SWEEP = Path(__file__).with_name("fake_sweep.py")


def same(a: list[TrialRecord], b: list[TrialRecord]) -> bool:
    """Field-by-field equality where NaN equals NaN (json writes both as NaN)."""
    return [json.dumps(r.to_row()) for r in a] == [json.dumps(r.to_row()) for r in b]


def test_new_store_has_schema_and_meta(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    with ResultsLogger(path) as store:
        assert store.count() == 0 and store.done_ids() == set()
    conn = sqlite3.connect(path)
    assert dict(conn.execute("SELECT key, value FROM meta")) == {
        "format": "fxsdc-results",
        "version": "1",
    }
    columns = [r[1] for r in conn.execute("PRAGMA table_info(trials)")]
    assert tuple(columns) == TRIAL_FIELDS
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_log_stores_each_trial_once_and_round_trips(tmp_path: Path) -> None:
    records = [fake_record(i) for i in range(12)]
    with ResultsLogger(tmp_path / "r.db") as store:
        assert store.log(records[0]) is True
        assert store.log(records[0]) is False
        assert store.log_many(records) == 11
        assert store.log_many(records) == 0
        assert store.count() == 12
        assert store.done_ids() == {r.trial_id for r in records}
        assert store.has(records[3].trial_id) and not store.has("nope")
        back = store.records()
    assert same(back, records)
    due = next(r for r in back if r.outcome == "DUE")
    assert (
        math.isnan(due.value_after) and due.injected_loss == math.inf
    )  # NaN is not turned into NULL


def test_bool_and_int_values_are_normalised(tmp_path: Path) -> None:
    record = dataclasses.replace(fake_record(5), detected=True, clean_loss=3)
    with ResultsLogger(tmp_path / "r.db") as store:
        store.log(record)
        (back,) = store.records()
    assert back.detected == 1 and type(back.detected) is int
    assert back.clean_loss == 3.0 and type(back.clean_loss) is float


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"outcome": "crash"}, "outcome='crash' is not one of masked, SDC, DUE"),
        ({"outcome": None}, "outcome is required"),
        ({"kind": "faulty"}, "kind='faulty' is not one of clean, injected"),
        ({"dtype": "float64"}, "dtype='float64'"),
        ({"location": "mlp"}, "location='mlp'"),
        ({"fault_model": "stuck"}, "fault_model='stuck'"),
        ({"reference": "oracle"}, "reference='oracle'"),
        ({"trial_id": ""}, "trial_id is empty"),
        ({"config_id": None}, "config_id is required"),
        ({"seed": "42"}, "seed='42' is not int"),
        ({"layer": 1.5}, "layer=1.5 is not int"),
        ({"clean_loss": "3.2"}, "clean_loss='3.2' is not float"),
        ({"epsilon": True}, "epsilon=True is not float"),
        ({"bit": 32}, "bit=32 is outside 0..31 for float32"),
        ({"dtype": "bfloat16", "bit": 16}, "bit=16 is outside 0..15 for bfloat16"),
        ({"detected": 2}, "detected=2 is not 0 or 1"),
        ({"detected": 1, "detected_by": '{"abft": 0}'}, "disagrees with detected_by"),
        ({"detected_by": "{bounds: 1}"}, "detected_by="),
        ({"detected_by": '{"bounds": 2}'}, "values other than 0/1"),
        ({"extra": "[]"}, r"extra='\[\]' is not a JSON dict"),
        ({"bits": "3"}, "bits='3' is not a JSON list"),
        ({"index": "(0, 1)"}, "index="),
    ],
)
def test_malformed_row_raises_and_writes_nothing(
    tmp_path: Path, change: dict, message: str
) -> None:
    good = fake_record(0)
    bad = dataclasses.replace(fake_record(1), **change)
    with ResultsLogger(tmp_path / "r.db") as store:
        with pytest.raises(ValueError, match=message) as info:
            store.log_many([good, bad])
        assert repr(bad.trial_id) in str(info.value)
        with pytest.raises(ValueError):
            store.log(bad)
        assert store.count() == 0


def test_export_round_trip(tmp_path: Path) -> None:
    records = [fake_record(i) for i in range(30)]
    records[4] = dataclasses.replace(
        records[4], fault_model=None, location=None, bit=None, bits=None, index=None
    )
    with ResultsLogger(tmp_path / "r.db") as store:
        store.log_many(records)
        assert store.export_csv(tmp_path / "r.csv") == 30
        assert store.export_jsonl(tmp_path / "r.jsonl") == 30
    assert same(read_export(tmp_path / "r.csv"), records)
    assert same(read_export(tmp_path / "r.jsonl"), records)
    header = (tmp_path / "r.csv").read_text().splitlines()[0]
    assert header == ",".join(TRIAL_FIELDS)
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(UserError, match="ends in .csv or .jsonl"):
        read_export(tmp_path / "r.db")
    (tmp_path / "bad.csv").write_text("trial_id,seed\nx,1\n")
    with pytest.raises(UserError, match="bad.csv: cannot read export: KeyError"):
        read_export(tmp_path / "bad.csv")


def test_configs_are_saved_by_id(tmp_path: Path) -> None:
    config = ExperimentConfig(exp_name="c", injection_idx=(0, 1, 2, 3))
    with ResultsLogger(tmp_path / "r.db") as store:
        assert store.save_config(config) == config.config_id
        assert store.save_config(config.to_dict()) == config.config_id
        saved = store.configs()
    assert list(saved) == [config.config_id]
    assert ExperimentConfig.from_dict(saved[config.config_id]) == config


def test_foreign_files_are_refused_untouched(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a database\n" * 100)
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    before = {p: p.read_bytes() for p in (text, other)}
    for path in before:
        with pytest.raises(UserError, match=f"^{path} is not an fxsdc results store$"):
            ResultsLogger(path)
        assert path.read_bytes() == before[path]
    with pytest.raises(UserError, match="no such results store"):
        ResultsLogger(tmp_path / "missing.db", create=False)
    assert not (tmp_path / "missing.db").exists()
    with pytest.raises(UserError, match="cannot open results store"):
        ResultsLogger(tmp_path / "no" / "dir.db")


def test_readonly_reads_and_never_modifies(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    with ResultsLogger(path) as store:
        store.log_many(fake_record(i) for i in range(6))
    before = path.read_bytes()
    with ResultsLogger(path, readonly=True) as store:
        assert same(store.records(), [fake_record(i) for i in range(6)])
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            store.log(fake_record(7))
    assert path.read_bytes() == before
    with pytest.raises(UserError, match="no such results store"):
        ResultsLogger(tmp_path / "typo.db", readonly=True)
    assert not (tmp_path / "typo.db").exists()
    empty = tmp_path / "empty.db"
    empty.touch()
    with pytest.raises(UserError, match="is not an fxsdc results store"):
        ResultsLogger(empty, readonly=True)
    assert empty.read_bytes() == b""


def test_other_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    ResultsLogger(path).close()
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("UPDATE meta SET value = '2' WHERE key = 'version'")
    conn.close()
    with pytest.raises(UserError, match="version 2; this fxsdc reads version 1"):
        ResultsLogger(path)


def test_store_missing_a_newer_column_gains_it(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    with ResultsLogger(path) as store:
        store.log(fake_record(0))
    conn = sqlite3.connect(path)
    conn.execute("ALTER TABLE trials DROP COLUMN extra")
    conn.close()
    with pytest.raises(UserError, match="lacks columns extra"):
        ResultsLogger(path, readonly=True)
    with ResultsLogger(path) as store:
        (back,) = store.records()
    assert back.extra == "{}"
    assert same([dataclasses.replace(back, extra=fake_record(0).extra)], [fake_record(0)])


def _count_rows(path: Path) -> int:
    try:
        conn = sqlite3.connect(path, timeout=0.1)
        try:
            return conn.execute("SELECT COUNT(*) FROM trials").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error:  # not created yet, or locked for an instant
        return 0


@pytest.mark.slow
def test_sigkill_mid_sweep_then_resume(tmp_path: Path) -> None:
    path = tmp_path / "sweep.db"
    n, batch = 200, 4
    command = [
        sys.executable,
        str(FAKE_SWEEP),
        str(path),
        "--n",
        str(n),
        "--batch",
        str(batch),
        "--sleep",
        "0.02",
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    # A liveness limit, not a timing claim: importing torch on a loaded 2-core machine is slow.
    deadline = time.monotonic() + 180
    while _count_rows(path) < 40:
        assert proc.poll() is None, "the fake sweep ended before it could be killed"
        assert time.monotonic() < deadline, "the fake sweep wrote nothing"
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL

    with ResultsLogger(path, create=False) as store:
        survived = store.records()
    assert 40 <= len(survived) < n  # killed mid-sweep
    assert len(survived) % batch == 0  # each forward pass's rows land together or not at all
    by_index = {r.run_index: r for r in survived}
    assert same(survived, [fake_record(i) for i in sorted(by_index)])  # no partial or corrupt row

    rerun = subprocess.run(command, capture_output=True, text=True, check=True)
    assert rerun.stdout.split() == ["skipped", str(len(survived)), "wrote", str(n - len(survived))]
    with ResultsLogger(path, create=False) as store:
        final = store.records()
    assert len(final) == n and len({r.trial_id for r in final}) == n
    assert same(sorted(final, key=lambda r: r.run_index), [fake_record(i) for i in range(n)])
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_two_shards_merged_equal_one_unsharded_run(tmp_path: Path) -> None:
    n = 200
    run(str(tmp_path / "all.db"), n)
    shards = [tmp_path / f"s{i}.db" for i in range(2)]
    for i, path in enumerate(shards):
        skipped, written = run(str(path), n, shard=(i, 2))
        assert skipped == 0 and 0 < written < n
    with ResultsLogger(shards[0]) as a, ResultsLogger(shards[1]) as b:
        assert not a.done_ids() & b.done_ids()
    assert merge_stores(shards, tmp_path / "merged.db") == (n, n)
    with (
        ResultsLogger(tmp_path / "merged.db", create=False) as merged,
        ResultsLogger(tmp_path / "all.db") as whole,
    ):
        key = lambda r: r.trial_id  # noqa: E731
        assert same(sorted(merged.records(), key=key), sorted(whole.records(), key=key))
    assert not list(tmp_path.glob("*.partial*"))


def test_merge_keeps_identical_duplicates_once_and_configs(tmp_path: Path) -> None:
    a, b = tmp_path / "a.db", tmp_path / "b.db"
    config = ExperimentConfig(exp_name="m")
    with ResultsLogger(a) as store:
        store.log_many(fake_record(i) for i in range(10))
        store.save_config(config)
    with ResultsLogger(b) as store:
        # a rerun of trials 5..14: same results, different timings
        store.log_many(dataclasses.replace(fake_record(i), elapsed_s=99.0) for i in range(5, 15))
        store.save_config(config)
    assert merge_stores([a, b], tmp_path / "m.db") == (20, 15)
    with ResultsLogger(tmp_path / "m.db", create=False) as merged:
        assert merged.configs() == {config.config_id: config.to_dict()}
        assert merged.records()[5].elapsed_s == fake_record(5).elapsed_s  # the first copy is kept


def test_merge_refuses_conflicting_duplicates_and_leaves_no_output(tmp_path: Path) -> None:
    a, b = tmp_path / "a.db", tmp_path / "b.db"
    with ResultsLogger(a) as store:
        store.log_many(fake_record(i) for i in range(10))
    changed = dataclasses.replace(
        fake_record(3), outcome="SDC" if fake_record(3).outcome != "SDC" else "masked"
    )
    with ResultsLogger(b) as store:
        store.log(changed)
    with pytest.raises(
        UserError, match=f"trial {changed.trial_id} is already in an earlier input with different"
    ):
        merge_stores([a, b], tmp_path / "m.db")
    assert not list(tmp_path.glob("m.db*"))


def test_merge_argument_errors(tmp_path: Path) -> None:
    a = tmp_path / "a.db"
    ResultsLogger(a).close()
    with pytest.raises(UserError, match="at least one input"):
        merge_stores([], tmp_path / "m.db")
    with pytest.raises(UserError, match="exists; merge writes a new store"):
        merge_stores([a], a)
    with pytest.raises(UserError, match="no such results store"):
        merge_stores([a, tmp_path / "missing.db"], tmp_path / "m.db")


def test_shard_of_is_stable_and_balanced() -> None:
    ids = [fake_record(i).trial_id for i in range(400)]
    shards = [shard_of(t, 4) for t in ids]
    assert shards == [shard_of(t, 4) for t in ids]
    assert all(60 < shards.count(s) < 140 for s in range(4))
    assert shard_of("abc", 1) == 0
    with pytest.raises(UserError):
        shard_of("abc", 0)


@pytest.mark.parametrize(
    ("text", "expected"), [("0/1", (0, 1)), ("3/4", (3, 4)), (" 1 / 2 ", (1, 2))]
)
def test_parse_shard(text: str, expected: tuple[int, int]) -> None:
    assert parse_shard(text) == expected


@pytest.mark.parametrize("text", ["4/4", "1/0", "-1/2", "1", "a/b", "1/2/3", ""])
def test_parse_shard_rejects(text: str) -> None:
    with pytest.raises(UserError, match="shard"):
        parse_shard(text)


def test_shard_from_env() -> None:
    assert shard_from_env({}) is None
    assert shard_from_env({"RANK": "2", "WORLD_SIZE": "8"}) == (2, 8)
    with pytest.raises(UserError, match="together"):
        shard_from_env({"RANK": "0"})
    with pytest.raises(UserError, match="RANK='8' WORLD_SIZE='8'"):
        shard_from_env({"RANK": "8", "WORLD_SIZE": "8"})
