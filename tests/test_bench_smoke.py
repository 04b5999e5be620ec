"""Smoke test of tools/bench.py: the quick eager run finishes and writes a complete report.

It checks the report's shape and the invariants the benchmark asserts or relies on, never
speed: timings on a shared machine say nothing about correctness.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fxsdc.checks import EAGER_SLICE_ELEMENTS

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {f"eager/{key}" for key in ("original", "none", "bounds", "softmax", "abft", "all",
                                         "all-noinject", "stored-logits")}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    # ~20 s on an idle 2-core machine; the timeout only guards against a hang on a loaded one.
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), "--quick",
                           "--no-compile", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "trial results identical one/pass vs many/pass: True" in proc.stdout
    return json.loads(out.read_text())


def test_every_variant_has_positive_times_ratios_and_memory(report):
    variants = report["variants"]
    assert set(variants) == VARIANTS
    for name, v in variants.items():
        assert v["error"] is None, name
        assert v["times_s"] and all(t > 0 for t in v["times_s"]), name
        assert v["median_s"] > 0 and v["ratio"] > 0 and v["ratio_min"] > 0, name
        assert v["reference"] == "eager/original"
        assert v["peak_total_bytes"] > 0 and v["peak_total_ratio"] > 0, name
        assert v["forward_peak_bytes"] > 0 and v["resident_bytes"] > 0, name
    assert variants["eager/original"]["ratio"] == 1.0
    # Faults off: the instrumented graphs compute the original's output bit for bit, and the
    # checks flag nothing on clean passes (the stored-logits reference has no detector).
    for name in VARIANTS - {"eager/original"}:
        assert variants[name]["bitwise_equal_to_reference"] is True, name
        expected = None if name == "eager/stored-logits" else 0
        assert variants[name]["clean_rows_flagged"] == expected, name


def test_sweep_trials_identical_one_and_many_per_pass(report):
    sweep = report["sweep"]
    assert sweep["batch"] >= 16 and sweep["identical"] is True
    assert sweep["trials"] == sweep["one_per_pass_trials"]
    assert len(sweep["trials"]) == sweep["batch"]
    # every trial carries one fault in its own sample, and the pass read it back
    assert [t["fault"]["index"] for t in sweep["trials"]] and all(
        t["outcome"] in ("masked", "SDC", "DUE") for t in sweep["trials"])
    for key in ("one_per_pass", "one_per_pass_batch1", "many_per_pass"):
        assert sweep[key]["trials_per_s"] > 0 and all(t > 0 for t in sweep[key]["pass_times_s"])
    assert sweep["many_per_pass"]["slots"] == sweep["batch"]
    assert sweep["speedup_vs_one_per_pass"] > 0 and sweep["speedup_vs_batch1"] > 0


def test_targets_and_meta_are_reported(report):
    names = [t["target"] for t in report["targets"]]
    assert any(n.startswith("faults off, no checks, compiled") for n in names)
    assert any(n.startswith("all online checks, compiled") for n in names)
    assert any(n.startswith("peak memory, all checks") for n in names)
    assert any(n.startswith("many trials/pass") for n in names)
    compiled = [t for t in report["targets"] if t["target"].endswith(", compiled")]
    assert all(t["met"] is None for t in compiled)  # --no-compile: no verdict, not a fake one
    meta = report["meta"]
    assert meta["quick"] and meta["machine"] and meta["wall_s"] > 0 and meta["memory_method"]
    assert meta["eager_slice_elements"] == EAGER_SLICE_ELEMENTS  # the default, recorded


def test_slice_size_option_is_checked():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), "--quick",
                           "--eager-slice-elements", "0"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "--eager-slice-elements must be at least 1" in proc.stderr
