"""Reports and plots over one or several results stores: what a reliability researcher reads after a sweep.

``fxsdc report DB [DB ...] [--plots DIR] [--json] [--by KEYS]`` merges the stores' ``trials``
tables in memory (first occurrence of a ``trial_id`` wins), computes every table with
:func:`build_report` and prints it with :func:`format_report`, or as JSON.

Report keys (``--json`` prints this dict; every float is finite, undefined numbers are ``null``).
A *stat* is ``{"k": int, "n": int, "rate": k/n | null, "ci95": [low, high] | null}`` (Wilson, 95 %).

- ``schema``: ``"fxsdc-report/1"``.
- ``sources``: ``{"paths": [...], "duplicates_dropped": int}`` (added by the CLI only).
- ``inputs``: ``n_trials``, ``n_injected``, ``n_clean``, ``models``, ``dtypes``, ``references``,
  ``checks`` (sorted lists).
- ``overall``: stats ``detection`` (detected / injected), ``sdc_coverage`` (detected SDC / SDC),
  ``due_detection`` (detected DUE / DUE), ``masked_detection`` (detected masked / masked: harmless
  flips, not a success), ``false_positive`` (detected clean / clean).
- ``outcomes``: rows ``{"outcome", "share": stat (outcome / injected), "detected": stat}``.
- ``by``: ``{key: [row, ...]}`` for each selected key of :data:`BY_KEYS`, in the order asked. A row
  is ``{"group": label, "n", "detection", "sdc_coverage", "due_detection", "masked_detection",
  "false_positive": stat | null}`` plus ``dtype``/``bit``/``field`` (key ``bit``) or ``layer``.
- ``bit_by_location``: ``{"bits": [label], "locations": [name], "k": [[int]], "n": [[int]]}``
  (detected / injected per cell, rows follow ``bits``).
- ``tightness``: rows ``{"quantity": "epsilon"|"margin"|"gap", "kind", "n", "n_nonfinite", "min",
  "p05", "p25", "median", "p75", "p95", "max", "mean"}`` over finite non-null values.
- ``histograms``: ``{"epsilon"|"margin": {"edges": [...], "counts": {kind: [...]}}}``.
- ``propagation``: ``by_layer`` rows ``{"layer", "n", "sdc": stat, "due": stat,
  "output_rel_diff": summary, "loss_delta": summary}`` (summary = ``{"n", "mean", "median"}`` over
  finite values); ``loss_vs_detection`` rows ``{"group": "detected"|"undetected", "n",
  "n_finite", "n_masked", "n_sdc", "n_due", "mean", "median", "p95", "max_abs"}`` of loss_delta;
  ``points``: ``[[loss_delta, detected, outcome], ...]`` (finite loss_delta, injected trials).
- ``comparison``: rows ``{"measure", "seed", "seed_low", "seed_high", "ours": stat | null,
  "verdict"}`` against the seed's published figures (DESIGN section 3).
"""
from __future__ import annotations

import argparse
import html
import json
import math
import sqlite3
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tabulate import tabulate

from fxsdc.errors import UserError
from fxsdc.schema import KINDS, OUTCOMES, TRIAL_FIELDS, TRIAL_SQL_COLUMNS

REPORT_SCHEMA = "fxsdc-report/1"
STORE_FORMAT = "fxsdc-results"
STORE_VERSION = "1"

BY_KEYS: tuple[str, ...] = ("bit", "field", "location", "layer", "model", "check")
# Clean trials carry a model and a detected_by map but no fault site, so a false-positive rate
# per group only means something for these keys.
_FP_KEYS = frozenset({"model", "check"})

# (total bits, exponent bits) per dtype; the sign is the top bit, the mantissa the low bits.
_DTYPE_LAYOUT: dict[str, tuple[int, int]] = {"float32": (32, 8), "bfloat16": (16, 8), "float16": (16, 5)}
_DTYPE_ALIASES = {"torch.float32": "float32", "fp32": "float32", "float": "float32",
                  "torch.bfloat16": "bfloat16", "bf16": "bfloat16",
                  "torch.float16": "float16", "fp16": "float16", "half": "float16"}
_FIELDS = ("sign", "exponent", "mantissa")
_LOCATION_ORDER = ("q", "k", "v", "scores", "weights", "out")
_QUANTILES = (("p05", 0.05), ("p25", 0.25), ("median", 0.5), ("p75", 0.75), ("p95", 0.95))
_HIST_BINS = 30
_REAL_FIELDS = tuple(name for name, sql_type in TRIAL_SQL_COLUMNS if sql_type == "REAL")

Stat = dict[str, Any]
Trial = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Primitives


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials; unlike the normal interval it stays
    inside [0, 1] and is not degenerate at k = 0 or k = n, where sweeps mostly live."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"wilson_interval needs 0 <= k <= n and n > 0, got k={k}, n={n}")
    p = k / n
    z2n = z * z / n
    center = (p + z2n / 2) / (1 + z2n)
    half = z / (1 + z2n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def _canonical_dtype(dtype: str) -> str:
    name = _DTYPE_ALIASES.get(dtype, dtype)
    if name not in _DTYPE_LAYOUT:
        raise UserError(f"unknown dtype {dtype!r}: expected one of {', '.join(_DTYPE_LAYOUT)}")
    return name


def bit_field(bit: int, dtype: str) -> str:
    """Which IEEE field bit ``bit`` (0 = least significant) of ``dtype`` lies in."""
    total, exponent = _DTYPE_LAYOUT[_canonical_dtype(dtype)]
    if not 0 <= bit < total:
        raise UserError(f"bit {bit} is out of range for {dtype} (0-{total - 1})")
    if bit == total - 1:
        return "sign"
    return "exponent" if bit >= total - 1 - exponent else "mantissa"


def _exponent_msb(dtype: str) -> int:
    total, _ = _DTYPE_LAYOUT[_canonical_dtype(dtype)]
    return total - 2


def _is_detected(t: Trial) -> bool:
    return t["detected"] == 1


def _stat(k: int, n: int) -> Stat:
    if n == 0:
        return {"k": 0, "n": 0, "rate": None, "ci95": None}
    low, high = wilson_interval(k, n)
    return {"k": k, "n": n, "rate": k / n, "ci95": [low, high]}


def _count(trials: Iterable[Trial], hit: Callable[[Trial], bool]) -> Stat:
    rows = list(trials)
    return _stat(sum(1 for t in rows if hit(t)), len(rows))


def _num(x: float) -> float | None:
    """JSON-safe float: a mean of huge finite values can still overflow to inf."""
    x = float(x)
    return x if math.isfinite(x) else None


def _finite(values: Iterable[Any]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def _summary(values: Sequence[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0, "mean": None, "median": None}
    return {"n": len(values), "mean": _num(np.mean(values)), "median": _num(np.median(values))}


# ---------------------------------------------------------------------------------------------
# Loading


def _check_store(conn: sqlite3.Connection, path: Path) -> None:
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if not {"meta", "trials"} <= tables:
        raise UserError(f"{path}: not an fxsdc results store (no meta/trials tables)")
    meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    if meta.get("format") != STORE_FORMAT:
        raise UserError(f"{path}: not an fxsdc results store (meta format is {meta.get('format')!r})")
    if meta.get("version") != STORE_VERSION:
        raise UserError(f"{path}: results store version {meta.get('version')!r} is not supported "
                        f"(this fxsdc reads version {STORE_VERSION})")
    columns = {r[1] for r in conn.execute("PRAGMA table_info(trials)")}
    missing = [f for f in TRIAL_FIELDS if f not in columns]
    if missing:
        raise UserError(f"{path}: trials table lacks columns {', '.join(missing)}")


def _read_store(path: Path) -> list[tuple[Any, ...]]:
    """The trials rows of one store, in TRIAL_FIELDS order, after checking it is an fxsdc store."""
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not an fxsdc results store")
    # Read-only URI: a report must never create or modify a store (sqlite3.connect would create
    # an empty database for a mistyped name).
    conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
    # Quoted: "index" is an SQL keyword.
    columns = ", ".join(f'"{f}"' for f in TRIAL_FIELDS)
    try:
        _check_store(conn, path)
        return conn.execute(f"SELECT {columns} FROM trials ORDER BY rowid").fetchall()
    except sqlite3.DatabaseError as exc:
        # A text file ("file is not a database") or a foreign schema (a meta table without key/value).
        raise UserError(f"{path}: not an fxsdc results store ({exc})") from None
    finally:
        conn.close()


def _normalise(t: Trial, where: str) -> Trial:
    """A copy of a trial row with detected_by as a dict and a canonical dtype; rejects rows the
    tables would silently miscount. Idempotent, so rows from load_trials or to_row both work."""
    t = dict(t)
    if t["kind"] not in KINDS:
        raise UserError(f"{where}: kind {t['kind']!r} is not one of {', '.join(KINDS)}")
    if t["kind"] == "injected" and t["outcome"] not in OUTCOMES:
        raise UserError(f"{where}: outcome {t['outcome']!r} is not one of {', '.join(OUTCOMES)}")
    detected_by = t["detected_by"]
    if isinstance(detected_by, str) or detected_by is None:
        try:
            detected_by = json.loads(detected_by or "{}")
        except json.JSONDecodeError:
            detected_by = None
    if not isinstance(detected_by, dict):
        raise UserError(f"{where}: detected_by is not a JSON object")
    t["detected_by"] = {str(c): int(bool(v)) for c, v in detected_by.items()}
    for name in _REAL_FIELDS:
        # SQLite turns a float NaN into NULL ("not measured"), so stores keep NaN as the text 'NaN'.
        if isinstance(t[name], str):
            try:
                t[name] = float(t[name])
            except ValueError:
                raise UserError(f"{where}: {name} is {t[name]!r}, not a number") from None
    t["detected"] = int(bool(t["detected"]))
    t["dtype"] = _canonical_dtype(t["dtype"])
    if t["bit"] is not None:
        bit_field(t["bit"], t["dtype"])  # raises on a bit outside the dtype
    return t


def _load(paths: Sequence[str | Path]) -> tuple[list[Trial], int]:
    """Trials of all stores, de-duplicated by trial_id, and how many duplicates were dropped."""
    if not paths:
        raise UserError("no results store given")
    trials: dict[str, Trial] = {}
    duplicates = 0
    for raw in paths:
        path = Path(raw)
        for row in _read_store(path):
            trial = dict(zip(TRIAL_FIELDS, row))
            if trial["trial_id"] in trials:
                # Shards of one sweep may overlap after a resumed run; trial_id hashes the
                # config, run and fault, so the same id is the same trial.
                duplicates += 1
                continue
            trials[trial["trial_id"]] = _normalise(trial, f"{path}: trial {trial['trial_id']}")
    if not trials:
        names = ", ".join(str(p) for p in paths)
        raise UserError(f"{names}: results store holds no trials" if len(paths) == 1
                        else f"none of the results stores ({names}) holds any trials")
    return list(trials.values()), duplicates


def load_trials(paths: Sequence[str | Path]) -> list[Trial]:
    """Read and merge the ``trials`` of one or more results stores (first trial_id wins).

    ``detected_by`` comes back parsed into a dict and ``dtype`` in canonical form.
    """
    return _load(paths)[0]


# ---------------------------------------------------------------------------------------------
# Building the numbers


def _detection_row(group: list[Trial], clean: list[Trial] | None) -> dict[str, Any]:
    return {
        "n": len(group),
        "detection": _count(group, _is_detected),
        "sdc_coverage": _count((t for t in group if t["outcome"] == "SDC"), _is_detected),
        "due_detection": _count((t for t in group if t["outcome"] == "DUE"), _is_detected),
        "masked_detection": _count((t for t in group if t["outcome"] == "masked"),
                                   _is_detected),
        "false_positive": None if clean is None else _count(clean, _is_detected),
    }


def _bit_label(dtype: str, bit: int, single_dtype: bool) -> str:
    return str(bit) if single_dtype else f"{dtype}:{bit}"


def _location_sort(loc: str) -> tuple[int, str]:
    return (_LOCATION_ORDER.index(loc), loc) if loc in _LOCATION_ORDER else (len(_LOCATION_ORDER), loc)


def _by_rows(key: str, injected: list[Trial], clean: list[Trial], single_dtype: bool) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    if key == "check":
        # A check counts only trials whose detected_by names it: configs that disabled the check
        # say nothing about it.
        checks = sorted({c for t in injected + clean for c in t["detected_by"]})
        for check in checks:
            group = [dict(t, detected=t["detected_by"][check]) for t in injected if check in t["detected_by"]]
            fp = [dict(t, detected=t["detected_by"][check]) for t in clean if check in t["detected_by"]]
            rows.append({"group": check, **_detection_row(group, fp)})
        return rows
    if key == "bit":
        sites = sorted({(t["dtype"], t["bit"]) for t in injected if t["bit"] is not None},
                       key=lambda s: (s[0], -s[1]))
        for dtype, bit in sites:
            group = [t for t in injected if t["dtype"] == dtype and t["bit"] == bit]
            rows.append({"group": _bit_label(dtype, bit, single_dtype), "dtype": dtype, "bit": bit,
                         "field": bit_field(bit, dtype), **_detection_row(group, None)})
        return rows
    if key == "field":
        for name in _FIELDS:
            group = [t for t in injected if t["bit"] is not None and bit_field(t["bit"], t["dtype"]) == name]
            if group:
                rows.append({"group": name, **_detection_row(group, None)})
        return rows
    if key == "location":
        for loc in sorted({t["location"] for t in injected if t["location"] is not None}, key=_location_sort):
            rows.append({"group": loc, **_detection_row([t for t in injected if t["location"] == loc], None)})
        return rows
    if key == "layer":
        for layer in sorted({t["layer"] for t in injected if t["layer"] is not None}):
            rows.append({"group": str(layer), "layer": layer,
                         **_detection_row([t for t in injected if t["layer"] == layer], None)})
        return rows
    assert key == "model", key  # parse_by admits only BY_KEYS
    for model in sorted({t["model"] for t in injected + clean}):
        rows.append({"group": model, **_detection_row([t for t in injected if t["model"] == model],
                                                      [t for t in clean if t["model"] == model])})
    return rows


def _bit_by_location(injected: list[Trial], single_dtype: bool) -> dict[str, Any]:
    sited = [t for t in injected if t["bit"] is not None and t["location"] is not None]
    bits = sorted({(t["dtype"], t["bit"]) for t in sited}, key=lambda s: (s[0], -s[1]))
    locations = sorted({t["location"] for t in sited}, key=_location_sort)
    k = [[0] * len(locations) for _ in bits]
    n = [[0] * len(locations) for _ in bits]
    row_of = {b: i for i, b in enumerate(bits)}
    col_of = {loc: j for j, loc in enumerate(locations)}
    for t in sited:
        i, j = row_of[(t["dtype"], t["bit"])], col_of[t["location"]]
        n[i][j] += 1
        k[i][j] += t["detected"]
    return {"bits": [_bit_label(d, b, single_dtype) for d, b in bits], "locations": locations, "k": k, "n": n}


def _quantity(t: Trial, quantity: str) -> float | None:
    if quantity == "gap":
        if t["upper"] is None or t["lower"] is None:
            return None
        return t["upper"] - t["lower"]
    return t[quantity]


def _tightness(trials: list[Trial]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    histograms: dict[str, Any] = {}
    for quantity in ("epsilon", "margin", "gap"):
        per_kind: dict[str, list[float]] = {}
        for kind in KINDS:
            raw = [v for v in (_quantity(t, quantity) for t in trials if t["kind"] == kind) if v is not None]
            if not raw:
                continue
            values = _finite(raw)
            per_kind[kind] = values
            row: dict[str, Any] = {"quantity": quantity, "kind": kind, "n": len(values),
                                   "n_nonfinite": len(raw) - len(values)}
            if values:
                qs = np.quantile(values, [q for _, q in _QUANTILES])
                row.update({"min": _num(min(values)), **{name: _num(v) for (name, _), v in zip(_QUANTILES, qs)},
                            "max": _num(max(values)), "mean": _num(np.mean(values))})
            else:
                row.update({"min": None, **{name: None for name, _ in _QUANTILES}, "max": None, "mean": None})
            rows.append(row)
        everything = [v for values in per_kind.values() for v in values]
        if quantity != "gap" and everything:
            # Shared edges so the clean and injected histograms are comparable bar for bar.
            edges = np.histogram_bin_edges(everything, bins=_HIST_BINS)
            histograms[quantity] = {
                "edges": [float(e) for e in edges],
                "counts": {kind: [int(c) for c in np.histogram(values, bins=edges)[0]]
                           for kind, values in per_kind.items()},
            }
    return rows, histograms


def _propagation(injected: list[Trial]) -> dict[str, Any]:
    by_layer = []
    for layer in sorted({t["layer"] for t in injected if t["layer"] is not None}):
        group = [t for t in injected if t["layer"] == layer]
        by_layer.append({
            "layer": layer, "n": len(group),
            "sdc": _count(group, lambda t: t["outcome"] == "SDC"),
            "due": _count(group, lambda t: t["outcome"] == "DUE"),
            "output_rel_diff": _summary(_finite(t["output_rel_diff"] for t in group)),
            "loss_delta": _summary(_finite(t["loss_delta"] for t in group)),
        })
    loss_rows = []
    for name, flag in (("detected", 1), ("undetected", 0)):
        group = [t for t in injected if t["detected"] == flag]
        deltas = _finite(t["loss_delta"] for t in group)
        loss_rows.append({
            "group": name, "n": len(group), "n_finite": len(deltas),
            "n_masked": sum(t["outcome"] == "masked" for t in group),
            "n_sdc": sum(t["outcome"] == "SDC" for t in group),
            "n_due": sum(t["outcome"] == "DUE" for t in group),
            "mean": _num(np.mean(deltas)) if deltas else None,
            "median": _num(np.median(deltas)) if deltas else None,
            "p95": _num(np.quantile(deltas, 0.95)) if deltas else None,
            "max_abs": _num(max(abs(d) for d in deltas)) if deltas else None,
        })
    points = [[float(t["loss_delta"]), t["detected"], t["outcome"]] for t in injected
              if t["loss_delta"] is not None and math.isfinite(t["loss_delta"])]
    return {"by_layer": by_layer, "loss_vs_detection": loss_rows, "points": points}


# The seed's published numbers (DESIGN section 3): GPT-2, float32, injected run compared with a clean
# baseline run. Ranges span its K!=V / K=V and s@w / comb variants.
_SEED_FIGURES: tuple[tuple[str, str, float, float], ...] = (
    ("overall detection", "4.5-7.3 %", 0.045, 0.073),
    ("exponent/sign bits", "16.1-24.7 %", 0.161, 0.247),
    ("exponent MSB (float32 bit 30)", "73-75 %", 0.73, 0.75),
    ("mantissa bits", "~0 %", 0.0, 0.0),
    ("check overhead", "13-20 %", 0.13, 0.20),
)


def _verdict(ours: Stat | None, low: float, high: float) -> str:
    if ours is None:
        return "not in store"
    if ours["ci95"] is None:
        return "no trials"
    if ours["ci95"][0] > high:
        return "higher than seed"
    if ours["ci95"][1] < low:
        return "lower than seed"
    return "consistent with seed"


def _comparison(injected: list[Trial]) -> list[dict[str, Any]]:
    with_bit = [t for t in injected if t["bit"] is not None]
    ours: dict[str, Stat | None] = {
        "overall detection": _count(injected, _is_detected),
        "exponent/sign bits": _count((t for t in with_bit if bit_field(t["bit"], t["dtype"]) != "mantissa"),
                                     _is_detected),
        # Bit 30 is float32's exponent MSB; 16-bit dtypes are compared at their own MSB (bit 14).
        "exponent MSB (float32 bit 30)": _count((t for t in with_bit if t["bit"] == _exponent_msb(t["dtype"])),
                                                _is_detected),
        "mantissa bits": _count((t for t in with_bit if bit_field(t["bit"], t["dtype"]) == "mantissa"),
                                _is_detected),
        # Trial rows hold per-trial wall time, not a with/without-checks pair: overhead comes from
        # the benchmark tool, so the store cannot give it.
        "check overhead": None,
    }
    return [{"measure": m, "seed": text, "seed_low": low, "seed_high": high, "ours": ours[m],
             "verdict": _verdict(ours[m], low, high)} for m, text, low, high in _SEED_FIGURES]


def parse_by(spec: str | Sequence[str] | None) -> list[str]:
    """Normalise a ``--by`` value ("bit,location" or a list) to known keys; None means all."""
    if spec is None:
        return list(BY_KEYS)
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    keys: list[str] = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        if item not in BY_KEYS:
            raise UserError(f"unknown --by key {item!r}: choose from {', '.join(BY_KEYS)}")
        if item not in keys:
            keys.append(item)
    if not keys:
        raise UserError(f"--by needs at least one key: choose from {', '.join(BY_KEYS)}")
    return keys


def build_report(trials: Sequence[Trial], by: str | Sequence[str] | None = None) -> dict[str, Any]:
    """All report numbers for ``trials`` (rows from :func:`load_trials` or ``TrialRecord.to_row``).

    Pure: the input is not modified and the result is JSON-serialisable (lists, no NaN/inf).
    """
    keys = parse_by(by)
    if not trials:
        raise UserError("no trials to report on")
    trials = [_normalise(t, f"trial {t['trial_id']}") for t in trials]
    injected = [t for t in trials if t["kind"] == "injected"]
    clean = [t for t in trials if t["kind"] == "clean"]
    single_dtype = len({t["dtype"] for t in injected}) <= 1
    overall = _detection_row(injected, clean)
    tightness, histograms = _tightness(trials)
    return {
        "schema": REPORT_SCHEMA,
        "inputs": {
            "n_trials": len(trials), "n_injected": len(injected), "n_clean": len(clean),
            "models": sorted({t["model"] for t in trials}),
            "dtypes": sorted({t["dtype"] for t in trials}),
            "references": sorted({t["reference"] for t in trials}),
            "checks": sorted({c for t in trials for c in t["detected_by"]}),
        },
        "overall": {k: overall[k] for k in ("detection", "sdc_coverage", "due_detection",
                                            "masked_detection", "false_positive")},
        "outcomes": [{"outcome": o, "share": _count(injected, lambda t, o=o: t["outcome"] == o),
                      "detected": _count((t for t in injected if t["outcome"] == o), _is_detected)}
                     for o in OUTCOMES],
        "by": {key: _by_rows(key, injected, clean, single_dtype) for key in keys},
        "bit_by_location": _bit_by_location(injected, single_dtype),
        "tightness": tightness,
        "histograms": histograms,
        "propagation": _propagation(injected),
        "comparison": _comparison(injected),
    }


# ---------------------------------------------------------------------------------------------
# Text and HTML tables


def _kn(s: Stat | None) -> str:
    return "-" if s is None else f"{s['k']}/{s['n']}"


def _rate_ci(s: Stat | None) -> str:
    if s is None or s["rate"] is None:
        return "-"
    low, high = s["ci95"]
    return f"{100 * s['rate']:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


_BY_TITLES = {"bit": "Detection by flipped bit", "field": "Detection by bit field",
              "location": "Detection by injection location", "layer": "Detection by layer",
              "model": "Detection by model", "check": "Detection by check (trials whose config ran the check)"}

Table = tuple[str, list[str], list[list[str]], str]  # title, headers, rows, note


def _tables(report: dict[str, Any]) -> list[Table]:
    """Every table of the report as (title, headers, rows, note): one source for text and HTML."""
    pct = "% [95% CI]"
    o = report["overall"]
    tables: list[Table] = [(
        "Overall",
        ["measure", "k/n", pct],
        [[label, _kn(o[key]), _rate_ci(o[key])] for label, key in (
            ("detection (detected / injected)", "detection"),
            ("coverage of SDC (detected SDC / SDC)", "sdc_coverage"),
            ("DUE-like detected (NaN/Inf)", "due_detection"),
            ("masked faults detected (harmless, not a success)", "masked_detection"),
            ("false positives on clean runs", "false_positive"))],
        "CI: Wilson score interval.",
    ), (
        "Outcomes of injected trials",
        ["outcome", "k/n", pct, "detected k/n", "detected " + pct],
        [[r["outcome"].replace("DUE", "DUE-like"), _kn(r["share"]), _rate_ci(r["share"]),
          _kn(r["detected"]), _rate_ci(r["detected"])] for r in report["outcomes"]],
        "",
    )]
    for key, rows in report["by"].items():
        headers = [key, "n", "detected", pct, "SDC det.", "coverage " + pct, "DUE det.", "masked det."]
        if key == "bit":
            headers.insert(1, "field")
        if key in _FP_KEYS:
            headers += ["clean FP", "FP " + pct]
        body = []
        for r in rows:
            line = [r["group"], str(r["n"]), _kn(r["detection"]), _rate_ci(r["detection"]),
                    _kn(r["sdc_coverage"]), _rate_ci(r["sdc_coverage"]), _kn(r["due_detection"]),
                    _kn(r["masked_detection"])]
            if key == "bit":
                line.insert(1, r["field"])
            if key in _FP_KEYS:
                line += [_kn(r["false_positive"]), _rate_ci(r["false_positive"])]
            body.append(line)
        tables.append((_BY_TITLES[key], headers, body, ""))
    quantiles = ["min", *[name for name, _ in _QUANTILES], "max", "mean"]
    tables.append((
        "Bound tightness (logit units)",
        ["quantity", "kind", "n", "non-finite", *quantiles],
        [[r["quantity"], r["kind"], str(r["n"]), str(r["n_nonfinite"]), *[_g(r[q]) for q in quantiles]]
         for r in report["tightness"]],
        "epsilon = a* - sum w*a; margin = max(lower - eps, eps - upper), > 0 means violated; gap = upper - lower.",
    ))
    prop = report["propagation"]
    tables.append((
        "Error propagation by layer (injected trials)",
        ["layer", "n", "SDC", "SDC " + pct, "DUE-like", "rel. diff mean", "rel. diff median",
         "dloss mean", "dloss median"],
        [[str(r["layer"]), str(r["n"]), _kn(r["sdc"]), _rate_ci(r["sdc"]), _kn(r["due"]),
          _g(r["output_rel_diff"]["mean"]), _g(r["output_rel_diff"]["median"]),
          _g(r["loss_delta"]["mean"]), _g(r["loss_delta"]["median"])] for r in prop["by_layer"]],
        "rel. diff = max|y' - y| / max|y| of the model output; dloss = injected - clean loss (nats); "
        "means over finite values.",
    ))
    tables.append((
        "Loss change versus detection (injected trials)",
        ["group", "n", "finite", "masked", "SDC", "DUE-like", "dloss mean", "dloss median", "dloss p95",
         "max |dloss|"],
        [[r["group"], str(r["n"]), str(r["n_finite"]), str(r["n_masked"]), str(r["n_sdc"]), str(r["n_due"]),
          _g(r["mean"]), _g(r["median"]), _g(r["p95"]), _g(r["max_abs"])] for r in prop["loss_vs_detection"]],
        "",
    ))
    refs = ", ".join(report["inputs"]["references"])
    tables.append((
        "Comparison with the seed's published figures",
        ["measure", "seed (published)", "ours k/n", "ours " + pct, "verdict"],
        [[r["measure"], r["seed"], _kn(r["ours"]), _rate_ci(r["ours"]), r["verdict"]]
         for r in report["comparison"]],
        "Seed: its published GPT-2 float32 results, injected run compared with a clean baseline run, "
        "ranges over K!=V/K=V and s@w/comb (DESIGN section 3). "
        f"Ours: all injected trials in the store (reference: {refs}); 16-bit dtypes use their exponent MSB, "
        "bit 14. Verdict compares our 95% CI with the seed's range.",
    ))
    return tables


def _headline(report: dict[str, Any]) -> str:
    i = report["inputs"]
    line = f"{i['n_trials']} trials ({i['n_injected']} injected, {i['n_clean']} clean)"
    src = report.get("sources")
    if src:
        line = (f"{len(src['paths'])} store(s), {line}, "
                f"{src['duplicates_dropped']} duplicate trial(s) dropped")
    return (f"fxsdc report: {line}\nmodels: {', '.join(i['models'])} | dtypes: {', '.join(i['dtypes'])} | "
            f"reference: {', '.join(i['references'])} | checks: {', '.join(i['checks']) or 'none'}")


def format_report(report: dict[str, Any]) -> str:
    """The report as plain-text tables (tabulate)."""
    parts = [_headline(report)]
    for title, headers, rows, note in _tables(report):
        block = f"\n{title}\n{tabulate(rows, headers=headers, disable_numparse=True)}"
        parts.append(block + (f"\n{note}" if note else ""))
    return "\n".join(parts) + "\n"


def _html(report: dict[str, Any], figures: list[tuple[Path, str]]) -> str:
    body = [f"<h1>fxsdc report</h1><p>{html.escape(_headline(report)).replace(chr(10), '<br>')}</p>"]
    for path, caption in figures:
        body.append(f'<figure><img src="{html.escape(path.name)}" alt="{html.escape(caption)}">'
                    f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    for title, headers, rows, note in _tables(report):
        table = tabulate(rows, headers=headers, tablefmt="html", disable_numparse=True)
        body.append(f"<h2>{html.escape(title)}</h2>{table}")
        if note:
            body.append(f"<p>{html.escape(note)}</p>")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>fxsdc report</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


# ---------------------------------------------------------------------------------------------
# Figures

_FIELD_COLOURS = {"sign": "tab:red", "exponent": "tab:orange", "mantissa": "tab:blue"}
_OUTCOME_COLOURS = {"masked": "tab:gray", "SDC": "tab:orange", "DUE": "tab:red"}


def _pct_errors(stats: list[Stat]) -> tuple[list[float], list[list[float]]]:
    rates = [100 * s["rate"] for s in stats]
    errors = [[100 * (s["rate"] - s["ci95"][0]) for s in stats], [100 * (s["ci95"][1] - s["rate"]) for s in stats]]
    return rates, errors


def _detection_bars(ax: Any, rows: list[dict[str, Any]], colours: list[str], label: str | None) -> None:
    """Detection bars with Wilson error bars, SDC coverage markers and n above each bar."""
    x = np.arange(len(rows))
    rates, errors = _pct_errors([r["detection"] for r in rows])
    ax.bar(x, rates, color=colours, yerr=errors, capsize=2, ecolor="black", label=label)
    covered = [(i, r["sdc_coverage"]) for i, r in enumerate(rows) if r["sdc_coverage"]["n"]]
    if covered:
        cov_rates, cov_err = _pct_errors([s for _, s in covered])
        # Shifted right so its error bar does not hide the bar's own.
        ax.errorbar([i + 0.25 for i, _ in covered], cov_rates, yerr=cov_err, fmt="D", color="black", markersize=4,
                    capsize=2, label="coverage of SDC")
    many = len(rows) > 12
    for i, r in enumerate(rows):
        ax.text(i, 103, f"n={r['n']}", ha="center", va="bottom", fontsize=7, rotation=90 if many else 0)
    ax.set_xticks(x, [r["group"] for r in rows], fontsize=8 if many else 10)
    ax.set_ylim(0, 115)
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("trials detected (%)")


def _plot_by_bit(fig: Any, report: dict[str, Any]) -> None:
    rows = report["by"]["bit"]
    ax = fig.add_subplot()
    # Bars are coloured by field, so the legend names fields rather than one bar series.
    _detection_bars(ax, rows, [_FIELD_COLOURS[r["field"]] for r in rows], None)
    from matplotlib.patches import Patch
    handles, _ = ax.get_legend_handles_labels()
    fields = sorted({r["field"] for r in rows}, key=_FIELDS.index)
    handles += [Patch(color=_FIELD_COLOURS[f], label=f"{f} bit: detected / injected") for f in fields]
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))
    dtypes = ", ".join(report["inputs"]["dtypes"])
    ax.set_xlabel(f"flipped bit ({dtypes}; 0 = least significant)")
    ax.set_title(f"Detection rate by flipped bit (n = {sum(r['n'] for r in rows)} injected trials, 95% Wilson CI)")


def _plot_by_location(fig: Any, report: dict[str, Any]) -> None:
    rows = report["by"]["location"]
    ax = fig.add_subplot()
    _detection_bars(ax, rows, ["tab:blue"] * len(rows), "detected / injected")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))
    ax.set_xlabel("injection location (attention tensor)")
    ax.set_title(f"Detection rate by location (n = {sum(r['n'] for r in rows)} injected trials, 95% Wilson CI)")


def _plot_heatmap(fig: Any, report: dict[str, Any]) -> None:
    grid = report["bit_by_location"]
    k, n = np.array(grid["k"], dtype=float), np.array(grid["n"], dtype=float)
    rate = np.ma.masked_where(n == 0, 100 * k / np.where(n == 0, 1, n))
    ax = fig.add_subplot()
    from matplotlib import colormaps
    cmap = colormaps["viridis"].with_extremes(bad="lightgray")  # cells without trials
    image = ax.imshow(rate, aspect="auto", cmap=cmap, vmin=0, vmax=100, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="trials detected (%)")
    ax.set_xticks(range(len(grid["locations"])), grid["locations"])
    ax.set_yticks(range(len(grid["bits"])), grid["bits"], fontsize=6 if len(grid["bits"]) > 16 else 9)
    for i in range(n.shape[0]):
        for j in range(n.shape[1]):
            if n[i, j]:
                ax.text(j, i, f"{int(k[i, j])}/{int(n[i, j])}", ha="center", va="center", fontsize=6,
                        color="white" if rate[i, j] < 50 else "black")
    ax.set_xlabel("injection location")
    ax.set_ylabel("flipped bit")
    ax.set_title(f"Detected / injected by bit and location (n = {int(n.sum())}; gray: no trials)")


def _plot_histogram(fig: Any, report: dict[str, Any], quantity: str) -> None:
    hist = report["histograms"][quantity]
    ax = fig.add_subplot()
    edges = np.array(hist["edges"])
    total = sum(sum(counts) for counts in hist["counts"].values())
    for kind, counts in hist["counts"].items():
        ax.stairs(counts, edges, label=f"{kind} (n = {sum(counts)})", linewidth=1.5)
    if quantity == "margin":
        ax.axvline(0, color="black", linestyle="--", linewidth=1, label="violation threshold (margin > 0)")
        ax.set_xlabel("violation margin max(lower - eps, eps - upper) (logit units)")
        ax.set_title(f"Bound violation margin of the bounds check (n = {total} trials with a finite margin)")
    else:
        ax.set_xlabel("epsilon = a* - sum_j w_j a_j (logit units)")
        ax.set_title(f"Softmax deviation epsilon (n = {total} trials with a finite epsilon)")
    ax.set_ylabel("trials (count)")
    ax.set_yscale("symlog", linthresh=1)
    ax.legend(fontsize=8)


def _plot_loss_vs_detection(fig: Any, report: dict[str, Any]) -> None:
    points = report["propagation"]["points"]
    ax = fig.add_subplot()
    rng = np.random.default_rng(0)  # fixed jitter: the same store gives the same picture
    for outcome in OUTCOMES:
        chosen = [p for p in points if p[2] == outcome]
        if chosen:
            ax.scatter([p[0] for p in chosen], [p[1] + rng.uniform(-0.2, 0.2) for p in chosen], s=10, alpha=0.7,
                       color=_OUTCOME_COLOURS[outcome],
                       label=f"{outcome.replace('DUE', 'DUE-like')} (n = {len(chosen)})")
    # Linear only below the smallest non-zero change (to a decade), so exact zeros (fully masked
    # flips) stay visible next to tiny changes; at most ~9 ticks keep the decade labels apart.
    nonzero = [abs(p[0]) for p in points if p[0] != 0]
    linthresh = 10.0 ** math.floor(math.log10(min(nonzero))) if nonzero else 1.0
    ax.set_xscale("symlog", linthresh=linthresh, linscale=2)
    ax.xaxis.get_major_locator().set_params(numticks=9)
    ax.set_yticks([0, 1], ["undetected", "detected"])
    ax.set_ylim(-0.5, 1.5)
    ax.set_xlabel("loss change = injected - clean loss (nats, symlog)")
    ax.set_ylabel("detector verdict")
    rows = report["propagation"]["loss_vs_detection"]
    omitted = sum(r["n"] for r in rows) - len(points)
    ax.set_title(f"Loss change versus detection (n = {len(points)} injected trials"
                 + (f"; {omitted} without a finite loss change not shown)" if omitted else ")"))
    ax.legend(fontsize=8)


def _figure_plan(report: dict[str, Any]) -> list[tuple[str, str, Callable[[Any, dict[str, Any]], None]]]:
    """Figures the report has data for: a figure without data is skipped, never drawn empty."""
    plan = []
    if report["by"].get("bit"):
        plan.append(("detection_by_bit.png", "Detection rate by flipped bit", _plot_by_bit))
    if report["by"].get("location"):
        plan.append(("detection_by_location.png", "Detection rate by injection location", _plot_by_location))
    if report["bit_by_location"]["bits"]:
        plan.append(("bit_location_heatmap.png", "Detection by bit and location", _plot_heatmap))
    for quantity in ("epsilon", "margin"):
        if quantity in report["histograms"]:
            plan.append((f"{quantity}_histogram.png", f"Histogram of {quantity}",
                         lambda fig, rep, q=quantity: _plot_histogram(fig, rep, q)))
    if report["propagation"]["points"]:
        plan.append(("loss_vs_detection.png", "Loss change versus detection", _plot_loss_vs_detection))
    return plan


def write_plots(report_or_trials: dict[str, Any] | Sequence[Trial], out_dir: str | Path) -> list[Path]:
    """Write the PNG figures the data supports and ``index.html`` into ``out_dir``.

    Returns the paths written, figures first, ``index.html`` last. Raises UserError, before
    creating ``out_dir``, when there is nothing to plot or ``out_dir`` is not a directory.
    """
    report = report_or_trials if isinstance(report_or_trials, dict) else build_report(report_or_trials)
    out = Path(out_dir)
    plan = _figure_plan(report)
    if not plan:
        raise UserError("nothing to plot: the store has no injected trials with a bit, location, "
                        "loss change or bound values")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    # Figure + FigureCanvasAgg directly: no pyplot, so no display backend and no global figure state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out.mkdir(parents=True, exist_ok=True)
    written: list[tuple[Path, str]] = []
    for name, caption, draw in plan:
        fig = Figure(figsize=(10, 6 if name != "bit_location_heatmap.png" else 9), layout="constrained")
        FigureCanvasAgg(fig)
        draw(fig, report)
        path = out / name
        fig.savefig(path, dpi=100)
        written.append((path, caption))
    index = out / "index.html"
    index.write_text(_html(report, written), encoding="utf-8")
    return [p for p, _ in written] + [index]


# ---------------------------------------------------------------------------------------------
# CLI


def run_report(args: argparse.Namespace) -> int:
    """Entry point of ``fxsdc report``; raises UserError for user mistakes."""
    by = parse_by(args.by)  # before loading: a typo should not wait for a large store
    trials, duplicates = _load(args.db)
    report = build_report(trials, by=by)
    report["sources"] = {"paths": [str(p) for p in args.db], "duplicates_dropped": duplicates}
    # Plots first: an error there must not leave half the output printed.
    written = write_plots(report, args.plots) if args.plots is not None else []
    if args.json:
        print(json.dumps(report, allow_nan=False))
    else:
        print(format_report(report), end="")
    if written:
        # stderr, so that --json output stays one parseable object.
        print(f"wrote {len(written)} files to {args.plots} (open {written[-1]})", file=sys.stderr)
    return 0


def add_report_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``report`` on an argparse subparsers object (``func=run_report``)."""
    parser = subparsers.add_parser(
        "report", help="tables and plots of one or more results stores",
        description="Detection rates, SDC coverage, false positives, bound tightness and error "
                    "propagation from one results store or several shards (merged by trial_id).")
    parser.add_argument("db", nargs="+", type=Path, metavar="DB", help="results store(s) (SQLite)")
    parser.add_argument("--plots", type=Path, metavar="DIR", help="write PNG figures and index.html to DIR")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--by", metavar="KEYS", default=None,
                        help=f"comma-separated breakdowns, from {','.join(BY_KEYS)} (default: all)")
    parser.set_defaults(func=run_report)
    return parser
