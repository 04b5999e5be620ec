"""fxsdc sweep / run / merge: a tiny sweep end to end, SIGKILL and resume, shards merged equal one
run, and user mistakes as one line with exit status 2."""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fxsdc import cli
from fxsdc.experiment_cli import ProgressPrinter, load_sweep
from fxsdc.runner import TIMING_KEYS, SweepProgress, batch_samples, planned_ids, shard_batches
from fxsdc.store import ResultsLogger

SLOW_SWEEP = Path(__file__).with_name("slow_sweep.py")
SWEEP = {
    "base_config": {"exp_name": "t", "model_name": "gpt2", "tiny": True, "batch_size": 4,
                    "seq_length": 8, "num_samples": 12, "num_runs": 1, "trials_per_pass": 4,
                    "checks": ["softmax", "bounds"], "injection_location": "weights"},
    "sweep_params": {"injection_bit": [30, 3]},
}
TOTAL = 2 * 12 * 2  # configs x samples x (clean + 1 run)


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


def rows(path: Path) -> dict[str, dict]:
    """trial_id -> the stored row without its timings."""
    with ResultsLogger(path, readonly=True) as store:
        records = store.records()
    result = {}
    for r in records:
        row = r.to_row()
        row.pop("elapsed_s")
        row["extra"] = {k: v for k, v in json.loads(row["extra"]).items() if k not in TIMING_KEYS}
        result[r.trial_id] = json.dumps(row, sort_keys=True)
    assert len(result) == len(records)
    return result


def planned(sweep_file: Path) -> set[str]:
    configs = load_sweep(sweep_file).generate_configs()
    return {t for c in configs for b in shard_batches(c, None)
            for t in planned_ids(c, b, batch_samples(c, b))}


@pytest.fixture(scope="module")
def sweep_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sweep") / "sweep.json"
    path.write_text(json.dumps(SWEEP))
    return path


@pytest.fixture(scope="module")
def reference(sweep_file: Path) -> tuple[Path, str]:
    """One uninterrupted, unsharded run through the CLI: (store, stderr)."""
    db = sweep_file.with_name("reference.db")
    code, out, err = run_cli("sweep", "--config", str(sweep_file), "--db", str(db))
    assert code == 0, err
    assert f"the store holds {TOTAL} trials" in out
    return db, err


def test_sweep_stores_every_trial_once_with_progress(sweep_file: Path,
                                                     reference: tuple[Path, str]) -> None:
    db, err = reference
    stored = rows(db)
    assert set(stored) == planned(sweep_file) and len(stored) == TOTAL
    with ResultsLogger(db, readonly=True) as store:
        records = store.records()
        assert len(store.configs()) == 2
    assert all(r.detected == 0 for r in records if r.kind == "clean")
    # Bit 30 of a softmax weight breaks the row sum: every such fault is caught.
    assert all(r.detected == 1 for r in records if r.kind == "injected" and r.bit == 30)
    assert f"trials {TOTAL}/{TOTAL} (100%)" in err.splitlines()[-1]
    assert "trials/s" in err and "\r" not in err  # not a terminal: plain lines


def test_rerun_needs_resume_and_then_runs_nothing(sweep_file: Path,
                                                  reference: tuple[Path, str]) -> None:
    db, _ = reference
    before = rows(db)
    code, _, err = run_cli("sweep", "--config", str(sweep_file), "--db", str(db))
    assert code == 2 and err.count("\n") == 1 and "pass --resume" in err
    code, _, err = run_cli("sweep", "--config", str(sweep_file), "--db", str(db), "--resume")
    assert code == 0 and "| 0.0 trials/s" in err.splitlines()[-1]
    assert rows(db) == before


def test_sigkill_mid_sweep_then_resume(sweep_file: Path, tmp_path: Path,
                                       reference: tuple[Path, str]) -> None:
    db = tmp_path / "killed.db"
    child = subprocess.Popen([sys.executable, str(SLOW_SWEEP), str(sweep_file), str(db), "0.5"],
                             stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    try:
        deadline = time.monotonic() + 120
        for line in child.stdout:  # "stored N" after each pass, then a 0.5 s pause
            assert time.monotonic() < deadline
            if line.startswith("stored") and int(line.split()[1]) > 0:
                break
        else:
            pytest.fail("the sweep ended before storing a pass")
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    survived = rows(db)
    assert 0 < len(survived) < TOTAL  # killed mid-sweep

    code, out, err = run_cli("sweep", "--config", str(sweep_file), "--db", str(db), "--resume")
    assert code == 0, err
    final = rows(db)
    assert set(final) == planned(sweep_file)  # every trial, each once (trial_id is the key)
    assert final == rows(reference[0])  # and the same results as an uninterrupted run
    assert all(final[t] == row for t, row in survived.items())
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_two_shards_merged_equal_one_unsharded_run(sweep_file: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   reference: tuple[Path, str]) -> None:
    db = tmp_path / "part.db"
    code, out, err = run_cli("sweep", "--config", str(sweep_file), "--db", str(db),
                             "--shard", "0/2")
    assert code == 0, err
    # Under torchrun every rank gets the same arguments; RANK/WORLD_SIZE pick the shard and
    # suffix the store per rank.
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, out, err = run_cli("sweep", "--config", str(sweep_file), "--db", str(db))
    assert code == 0, err
    rank1 = tmp_path / "part.rank1-of-2.db"
    shard0, shard1 = rows(db), rows(rank1)
    assert shard0 and shard1 and not set(shard0) & set(shard1)

    merged = tmp_path / "merged.db"
    code, out, err = run_cli("merge", str(merged), str(db), str(rank1))
    assert code == 0, err
    assert rows(merged) == rows(reference[0])
    with ResultsLogger(merged, readonly=True) as store:
        assert len(store.configs()) == 2


def test_run_prints_a_summary_or_json_and_stores(tmp_path: Path) -> None:
    flags = ["run", "--model", "gpt2", "--tiny", "--batch-size", "2", "--seq-length", "8",
             "--num-samples", "2", "--num-runs", "2", "--checks", "softmax",
             "--location", "weights", "--trials-per-pass", "2"]
    code, out, err = run_cli(*flags)
    assert code == 0, err
    assert "clean (no fault)" in out and "softmax" in out
    db = tmp_path / "run.db"
    code, out, err = run_cli(*flags, "--json", "--db", str(db))
    assert code == 0, err
    trials = json.loads(out)
    assert len(trials) == 2 + 4 and {t["kind"] for t in trials} == {"clean", "injected"}
    assert set(rows(db)) == {t["trial_id"] for t in trials}


def test_run_reads_a_config_file_and_flags_override_it(tmp_path: Path) -> None:
    config = tmp_path / "one.yaml"
    config.write_text("model_name: gpt2\ntiny: true\nbatch_size: 2\nseq_length: 8\n"
                      "num_samples: 2\nchecks: []\ninjection_enabled: false\n")
    code, out, err = run_cli("run", "--config", str(config), "--json", "--num-samples", "4")
    assert code == 0, err
    assert [t["kind"] for t in json.loads(out)] == ["clean"] * 4


@pytest.mark.parametrize("argv,message", [
    (["sweep", "--template", "huge", "--db", "{db}"], "unknown template 'huge'"),
    (["sweep", "--config", "{tmp}/missing.json", "--db", "{db}"], "cannot read sweep config"),
    (["sweep", "--config", "{bad_json}", "--db", "{db}"], "malformed sweep config"),
    (["sweep", "--config", "{bad_field}", "--db", "{db}"], "unknown config field 'bitt'"),
    (["sweep", "--template", "quick", "--db", "{not_store}"], "is not an fxsdc results store"),
    (["sweep", "--template", "quick", "--db", "{db}", "--shard", "2/2"], "need N >= 1"),
    (["sweep", "--template", "quick", "--db", "{db}", "--set", "seed"], "expected FIELD=VALUE"),
    (["sweep", "--template", "quick", "--db", "{db}", "--limit", "0"], "--limit must be >= 1"),
    (["sweep", "--config", "{tmp}/x.json"], "the following arguments are required: --db"),
    (["run", "--model", "tinyllama", "--tiny", "--checks", "comb"], "K != V"),
    (["run", "--model", "gpt2", "--tiny", "--bit", "x"], "invalid int value"),
    (["run", "--model", "gpt2", "--tiny", "--layers", "0,a"], "not a comma-separated list"),
    (["run", "--config", "{bad_json}"], "malformed config"),
    (["merge", "{tmp}/out.db", "{not_store}"], "is not an fxsdc results store"),
])
def test_user_errors_are_one_line_and_write_nothing(tmp_path: Path, argv: list[str],
                                                    message: str) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "bad_field.json").write_text(json.dumps({"bitt": 3}))
    not_store = tmp_path / "notes.db"
    not_store.write_text("my notes\n")
    names = {"db": str(tmp_path / "new.db"), "tmp": str(tmp_path),
             "bad_json": str(tmp_path / "bad.json"), "bad_field": str(tmp_path / "bad_field.json"),
             "not_store": str(not_store)}
    code, out, err = run_cli(*(a.format(**names) for a in argv))
    assert code == 2 and out == ""
    assert err.startswith("fxsdc: ") and err.count("\n") == 1 and message in err, err
    assert not_store.read_text() == "my notes\n"
    assert not (tmp_path / "out.db").exists()
    if (tmp_path / "new.db").exists():  # a store opened before the error holds no trial
        with ResultsLogger(tmp_path / "new.db", readonly=True) as store:
            assert store.count() == 0


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_redrawn_on_a_terminal_and_throttled_lines_otherwise() -> None:
    state = SweepProgress(total=10, skipped=4, ran=2, detected=1)
    log = io.StringIO()
    printer = ProgressPrinter(log, interval=3600)
    printer(state)
    printer(state)  # within the interval: nothing new
    printer.finish()
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("trials 6/10 (60%)")
    assert "detected 1" in lines[0] and "clean flagged 0" in lines[0]
    term = FakeTerminal()
    printer = ProgressPrinter(term)
    printer(state)
    printer.finish()
    assert term.getvalue().startswith("\rtrials 6/10") and term.getvalue().endswith("\n")
