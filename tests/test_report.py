"""Tests of fxsdc.report against small stores whose every number is known by hand."""
from __future__ import annotations

import argparse
import json
import math
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from fxsdc.errors import UserError
from fxsdc.report import (
    BY_KEYS,
    add_report_command,
    bit_field,
    build_report,
    format_report,
    load_trials,
    run_report,
    wilson_interval,
    write_plots,
)
from fxsdc.schema import TRIAL_FIELDS, TRIAL_SQL_COLUMNS, TrialRecord

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIGURES = ("detection_by_bit.png", "detection_by_location.png", "bit_location_heatmap.png",
           "epsilon_histogram.png", "margin_histogram.png", "loss_vs_detection.png")


def make_store(path: Path, rows: list[dict[str, Any]], meta: dict[str, str] | None = None) -> Path:
    """An fxsdc results store in the fixed format, written with plain sqlite3."""
    conn = sqlite3.connect(path)
    cols = ", ".join(f'"{name}" {typ}' + (" PRIMARY KEY" if name == "trial_id" else "")
                     for name, typ in TRIAL_SQL_COLUMNS)
    conn.execute(f"CREATE TABLE trials ({cols})")
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    conn.execute("CREATE TABLE configs (config_id TEXT PRIMARY KEY, config TEXT)")
    conn.executemany("INSERT INTO meta VALUES (?, ?)",
                     (meta or {"format": "fxsdc-results", "version": "1"}).items())
    conn.execute("INSERT INTO configs VALUES ('cfg', ?)", (json.dumps({"exp_name": "known"}),))
    conn.executemany(f"INSERT INTO trials VALUES ({', '.join('?' * len(TRIAL_FIELDS))})",
                     [[r[f] for f in TRIAL_FIELDS] for r in rows])
    conn.commit()
    conn.close()
    return path


def _trial(i: int, kind: str, **kw: Any) -> dict[str, Any]:
    base = dict(trial_id=f"t{i:03d}", config_id="cfg", exp_name="known", model="gpt2", dataset="wikitext",
                dtype="float32", seed=0, run_index=i, kind=kind)
    return TrialRecord(**base, **kw).to_row()


def _injected(i: int, bit: int, location: str, layer: int, outcome: str, by: dict[str, int]) -> dict[str, Any]:
    loss = {"masked": 0.0, "SDC": 0.5, "DUE": math.inf}[outcome]
    return _trial(i, "injected", fault_model="bitflip", layer=layer, location=location, bit=bit,
                  bits=json.dumps([bit]), outcome=outcome, detected=int(any(by.values())),
                  detected_by=json.dumps(by), loss_delta=loss, output_rel_diff=loss / 5,
                  clean_loss=3.0, injected_loss=3.0 + loss,
                  margin=1.0 if by["bounds"] else -0.5)


NONE = {"bounds": 0, "abft": 0}
BOUNDS = {"bounds": 1, "abft": 0}
ABFT = {"bounds": 0, "abft": 1}


def known_rows() -> list[dict[str, Any]]:
    """20 injected + 10 clean float32 trials on gpt2.

    bit 30 (exponent), scores, layer 0: SDC 6 (5 detected), DUE 2 (2 detected), masked 2 (0)
    bit 31 (sign), weights, layer 1:    SDC 2 (1 detected by abft), masked 2 (0)
    bit 3 (mantissa), scores, layer 1:  SDC 1 (0), masked 5 (1 detected)
    clean: 10, one flagged by bounds; epsilon 0.0 .. 0.9, lower 0, upper 1.
    """
    spec = ([(30, "scores", 0, "SDC", BOUNDS)] * 5 + [(30, "scores", 0, "SDC", NONE)]
            + [(30, "scores", 0, "DUE", BOUNDS)] * 2 + [(30, "scores", 0, "masked", NONE)] * 2
            + [(31, "weights", 1, "SDC", ABFT), (31, "weights", 1, "SDC", NONE)]
            + [(31, "weights", 1, "masked", NONE)] * 2
            + [(3, "scores", 1, "SDC", NONE), (3, "scores", 1, "masked", BOUNDS)]
            + [(3, "scores", 1, "masked", NONE)] * 4)
    rows = [_injected(i, *s) for i, s in enumerate(spec)]
    for j in range(10):
        by = BOUNDS if j == 0 else NONE
        rows.append(_trial(100 + j, "clean", outcome="masked", detected=by["bounds"], detected_by=json.dumps(by),
                           epsilon=j / 10, lower=0.0, upper=1.0, margin=j / 10 - 1.0, loss_delta=0.0))
    return rows


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The known trials split over two shards that overlap in three trials."""
    d = tmp_path_factory.mktemp("shards")
    rows = known_rows()
    return [make_store(d / "a.db", rows[:18]), make_store(d / "b.db", rows[15:])]


@pytest.fixture(scope="module")
def report(shards: list[Path]) -> dict[str, Any]:
    return build_report(load_trials(shards))


def cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fxsdc")
    add_report_command(parser.add_subparsers(dest="command"))
    return parser.parse_args(["report", *argv])


def kn(stat: dict[str, Any]) -> tuple[int, int]:
    return stat["k"], stat["n"]


# --- primitives -------------------------------------------------------------------------------


def test_wilson_interval_matches_hand_computation() -> None:
    # p = 0.3, z^2/n = 0.38416: centre (0.3 + 0.19208) / 1.38416 = 0.35551,
    # half-width 1.96 * sqrt(0.021 + 0.009604) / 1.38416 = 0.24772.
    low, high = wilson_interval(3, 10)
    assert low == pytest.approx(0.10779, abs=1e-5) and high == pytest.approx(0.60322, abs=1e-5)
    # k = 0: lower bound 0, upper z^2 / (n + z^2).
    assert wilson_interval(0, 10) == pytest.approx((0.0, 3.8416 / 13.8416))
    assert wilson_interval(10, 10)[1] == 1.0
    with pytest.raises(ValueError):
        wilson_interval(1, 0)


@pytest.mark.parametrize("dtype, bit, field", [
    ("float32", 31, "sign"), ("float32", 30, "exponent"), ("float32", 23, "exponent"),
    ("float32", 22, "mantissa"), ("float32", 0, "mantissa"),
    ("bfloat16", 15, "sign"), ("bfloat16", 7, "exponent"), ("bfloat16", 6, "mantissa"),
    ("float16", 15, "sign"), ("float16", 10, "exponent"), ("float16", 9, "mantissa"),
])
def test_bit_field(dtype: str, bit: int, field: str) -> None:
    assert bit_field(bit, dtype) == field


def test_bit_field_rejects_out_of_range() -> None:
    with pytest.raises(UserError):
        bit_field(16, "bfloat16")
    with pytest.raises(UserError):
        bit_field(1, "int8")


# --- numbers of the known store -----------------------------------------------------------------


def test_merge_deduplicates_by_trial_id(shards: list[Path]) -> None:
    trials = load_trials(shards)
    assert len(trials) == 30
    assert len({t["trial_id"] for t in trials}) == 30


def test_build_report_takes_raw_rows_and_is_pure(report: dict[str, Any]) -> None:
    rows = known_rows()
    before = json.dumps(rows)
    assert build_report(rows) == report  # the de-duplicated shards hold exactly these rows
    assert json.dumps(rows) == before


def test_overall_numbers(report: dict[str, Any]) -> None:
    o = report["overall"]
    assert report["inputs"]["n_injected"] == 20 and report["inputs"]["n_clean"] == 10
    assert kn(o["detection"]) == (9, 20)
    assert kn(o["sdc_coverage"]) == (6, 9)
    assert kn(o["due_detection"]) == (2, 2)
    assert kn(o["masked_detection"]) == (1, 9)
    assert kn(o["false_positive"]) == (1, 10)
    assert o["false_positive"]["rate"] == pytest.approx(0.1)
    assert o["false_positive"]["ci95"] == pytest.approx(list(wilson_interval(1, 10)))
    assert [(r["outcome"], kn(r["share"]), kn(r["detected"])) for r in report["outcomes"]] == [
        ("masked", (9, 20), (1, 9)), ("SDC", (9, 20), (6, 9)), ("DUE", (2, 20), (2, 2))]


def test_by_bit_and_field(report: dict[str, Any]) -> None:
    rows = {r["bit"]: r for r in report["by"]["bit"]}
    assert [r["bit"] for r in report["by"]["bit"]] == [31, 30, 3]
    assert {b: r["field"] for b, r in rows.items()} == {31: "sign", 30: "exponent", 3: "mantissa"}
    assert kn(rows[30]["detection"]) == (7, 10)
    assert kn(rows[30]["sdc_coverage"]) == (5, 6)
    assert kn(rows[31]["detection"]) == (1, 4) and kn(rows[31]["sdc_coverage"]) == (1, 2)
    assert kn(rows[3]["detection"]) == (1, 6) and kn(rows[3]["sdc_coverage"]) == (0, 1)
    assert kn(rows[3]["masked_detection"]) == (1, 5)
    # 7/10 mirrors the hand-computed 3/10 interval.
    assert rows[30]["detection"]["ci95"] == pytest.approx([1 - 0.60322, 1 - 0.10779], abs=1e-5)
    fields = {r["group"]: kn(r["detection"]) for r in report["by"]["field"]}
    assert fields == {"sign": (1, 4), "exponent": (7, 10), "mantissa": (1, 6)}


def test_by_location_layer_model_check(report: dict[str, Any]) -> None:
    by = report["by"]
    assert [(r["group"], kn(r["detection"])) for r in by["location"]] == [("scores", (8, 16)), ("weights", (1, 4))]
    assert [(r["layer"], kn(r["detection"]), kn(r["sdc_coverage"])) for r in by["layer"]] == [
        (0, (7, 10), (5, 6)), (1, (2, 10), (1, 3))]
    (model,) = by["model"]
    assert kn(model["detection"]) == (9, 20) and kn(model["false_positive"]) == (1, 10)
    checks = {r["group"]: r for r in by["check"]}
    assert kn(checks["bounds"]["detection"]) == (8, 20) and kn(checks["bounds"]["false_positive"]) == (1, 10)
    assert kn(checks["abft"]["detection"]) == (1, 20) and kn(checks["abft"]["false_positive"]) == (0, 10)
    assert kn(checks["abft"]["sdc_coverage"]) == (1, 9)


def test_bit_by_location_grid(report: dict[str, Any]) -> None:
    grid = report["bit_by_location"]
    assert grid["bits"] == ["31", "30", "3"] and grid["locations"] == ["scores", "weights"]
    assert grid["k"] == [[0, 1], [7, 0], [1, 0]]
    assert grid["n"] == [[0, 4], [10, 0], [6, 0]]


def test_tightness_quantiles(report: dict[str, Any]) -> None:
    rows = {(r["quantity"], r["kind"]): r for r in report["tightness"]}
    eps = rows[("epsilon", "clean")]
    assert (eps["n"], eps["min"], eps["median"], eps["max"]) == (10, 0.0, pytest.approx(0.45), 0.9)
    assert rows[("gap", "clean")]["median"] == 1.0
    margin = rows[("margin", "injected")]
    assert margin["n"] == 20 and margin["max"] == 1.0 and margin["min"] == -0.5
    assert ("epsilon", "injected") not in rows  # no injected row carries epsilon
    assert sum(report["histograms"]["epsilon"]["counts"]["clean"]) == 10


def test_propagation(report: dict[str, Any]) -> None:
    layers = {r["layer"]: r for r in report["propagation"]["by_layer"]}
    assert kn(layers[0]["sdc"]) == (6, 10) and kn(layers[0]["due"]) == (2, 10)
    assert layers[0]["loss_delta"] == {"n": 8, "mean": pytest.approx(3 / 8), "median": 0.5}  # inf left out
    assert kn(layers[1]["sdc"]) == (3, 10)
    det, undet = report["propagation"]["loss_vs_detection"]
    assert (det["group"], det["n"], det["n_finite"], det["n_sdc"], det["n_due"], det["n_masked"]) == (
        "detected", 9, 7, 6, 2, 1)
    assert det["mean"] == pytest.approx(3 / 7)
    assert (undet["n"], undet["n_sdc"], undet["n_masked"]) == (11, 3, 8)
    assert undet["mean"] == pytest.approx(1.5 / 11)
    assert len(report["propagation"]["points"]) == 18


def test_comparison_with_seed(report: dict[str, Any]) -> None:
    rows = {r["measure"]: r for r in report["comparison"]}
    assert kn(rows["overall detection"]["ours"]) == (9, 20)
    assert kn(rows["exponent/sign bits"]["ours"]) == (8, 14)
    assert kn(rows["exponent MSB (float32 bit 30)"]["ours"]) == (7, 10)
    assert kn(rows["mantissa bits"]["ours"]) == (1, 6)
    assert rows["check overhead"]["ours"] is None
    assert rows["overall detection"]["seed_low"] == 0.045
    assert rows["overall detection"]["verdict"] == "higher than seed"  # CI of 9/20 starts at 25.8 %
    assert rows["exponent MSB (float32 bit 30)"]["verdict"] == "consistent with seed"


def test_mixed_dtypes_label_bits_per_dtype(tmp_path: Path) -> None:
    rows = [_injected(0, 30, "q", 0, "SDC", BOUNDS), _injected(1, 14, "q", 0, "SDC", NONE),
            _injected(2, 3, "q", 0, "masked", NONE)]
    rows[1]["dtype"] = rows[2]["dtype"] = "bfloat16"
    rep = build_report(load_trials([make_store(tmp_path / "mixed.db", rows)]))
    assert [(r["group"], r["field"]) for r in rep["by"]["bit"]] == [
        ("bfloat16:14", "exponent"), ("bfloat16:3", "mantissa"), ("float32:30", "exponent")]
    msb = {r["measure"]: r for r in rep["comparison"]}["exponent MSB (float32 bit 30)"]
    assert kn(msb["ours"]) == (1, 2)  # float32 bit 30 and bfloat16 bit 14


def test_nan_stored_as_text_counts_as_non_finite(tmp_path: Path) -> None:
    row = _injected(0, 30, "scores", 0, "DUE", BOUNDS)
    row.update(loss_delta="NaN", output_rel_diff="NaN", epsilon="NaN", margin=2.0)
    rep = build_report(load_trials([make_store(tmp_path / "nan.db", [row])]))
    eps = {(r["quantity"], r["kind"]): r for r in rep["tightness"]}[("epsilon", "injected")]
    assert (eps["n"], eps["n_nonfinite"], eps["median"]) == (0, 1, None)
    assert rep["propagation"]["points"] == []
    assert rep["propagation"]["loss_vs_detection"][0]["n_finite"] == 0
    json.dumps(rep, allow_nan=False)


def test_by_selects_tables(shards: list[Path]) -> None:
    rep = build_report(load_trials(shards), by="location,bit")
    assert list(rep["by"]) == ["location", "bit"]


# --- text, JSON, CLI ---------------------------------------------------------------------------


def test_text_report_shows_counts(report: dict[str, Any]) -> None:
    text = format_report(report)
    for needle in ("coverage of SDC", "6/9", "false positives on clean runs", "1/10", "exponent", "mantissa",
                   "Bound tightness", "Error propagation by layer", "seed's published", "4.5-7.3 %",
                   "10.0 [1.8, 40.4]"):
        assert needle in text, needle


def test_json_round_trips_and_matches_tables(shards: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert run_report(cli([*map(str, shards), "--json"])) == 0
    data = json.loads(capsys.readouterr().out)
    assert data.pop("sources") == {"paths": [str(p) for p in shards], "duplicates_dropped": 3}
    assert data == build_report(load_trials(shards))
    assert json.loads(json.dumps(data, allow_nan=False)) == data
    assert set(data["by"]) == set(BY_KEYS)


def test_text_cli(shards: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert run_report(cli([str(shards[0]), str(shards[1]), "--by", "bit"])) == 0
    out = capsys.readouterr().out
    assert "3 duplicate trial(s) dropped" in out
    assert "Detection by flipped bit" in out and "Detection by injection location" not in out


# --- plots -------------------------------------------------------------------------------------


def test_plots_are_valid_non_blank_pngs(report: dict[str, Any], tmp_path: Path) -> None:
    import matplotlib.image

    out = tmp_path / "figs"
    written = write_plots(report, out)
    assert [p.name for p in written] == [*FIGURES, "index.html"]
    for name in FIGURES:
        path = out / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        pixels = matplotlib.image.imread(path)
        assert pixels.size and (pixels != pixels[0, 0]).any(), f"{name} is one colour"
    page = (out / "index.html").read_text(encoding="utf-8")
    assert all(f'src="{name}"' in page for name in FIGURES)
    assert page.count("<table") == len(BY_KEYS) + 6


def test_plots_from_cli_follow_the_report(shards: list[Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    # Shard a holds no clean trials, hence no epsilon; --by check drops the bit/location bars.
    assert run_report(cli([str(shards[0]), "--json", "--plots", str(out), "--by", "check"])) == 0
    captured = capsys.readouterr()
    json.loads(captured.out)
    assert "wrote 4 files" in captured.err  # the plots message stays out of the JSON
    assert sorted(p.name for p in out.iterdir()) == ["bit_location_heatmap.png", "index.html",
                                                     "loss_vs_detection.png", "margin_histogram.png"]


# --- errors ------------------------------------------------------------------------------------


def _err(argv: list[str]) -> str:
    with pytest.raises(UserError) as info:
        run_report(cli(argv))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_file(tmp_path: Path) -> None:
    assert "no such file" in _err([str(tmp_path / "nope.db")])
    assert not (tmp_path / "nope.db").exists()  # read-only open: nothing created


def test_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_text("trial_id,kind\n" * 50)
    assert "not an fxsdc results store" in _err([str(path)])


def test_foreign_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE users (id INTEGER)")
    conn.commit()
    conn.close()
    assert "not an fxsdc results store" in _err([str(path)])
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE meta (name TEXT)")  # same table names, foreign columns
    conn.execute("CREATE TABLE trials (id INTEGER)")
    conn.commit()
    conn.close()
    assert "not an fxsdc results store" in _err([str(path)])
    wrong = make_store(tmp_path / "wrong.db", [], meta={"format": "something-else", "version": "1"})
    assert "not an fxsdc results store" in _err([str(wrong)])
    future = make_store(tmp_path / "future.db", [], meta={"format": "fxsdc-results", "version": "2"})
    assert "version" in _err([str(future)])


def test_empty_store(tmp_path: Path) -> None:
    assert "no trials" in _err([str(make_store(tmp_path / "empty.db", []))])


def test_unknown_by_key(shards: list[Path]) -> None:
    assert "unknown --by key 'bits'" in _err([str(shards[0]), "--by", "bit,bits"])
    with pytest.raises(UserError):
        build_report(load_trials(shards), by=["colour"])


def test_nothing_to_plot_creates_no_directory(tmp_path: Path) -> None:
    clean_only = make_store(tmp_path / "clean.db", [_trial(1, "clean", outcome="masked")])
    out = tmp_path / "figs"
    assert "nothing to plot" in _err([str(clean_only), "--plots", str(out)])
    assert not out.exists()


def test_bad_row_is_reported(tmp_path: Path) -> None:
    row = _injected(1, 40, "q", 0, "SDC", NONE)
    assert "out of range" in _err([str(make_store(tmp_path / "bad.db", [row]))])
