"""The trial record: one row of the results store, shared by the runner, the store and the report.

A *trial* is one forward pass outcome for one fault (``kind="injected"``) or for no fault at all
(``kind="clean"``, used to measure false alarms). Every field is a plain JSON/SQLite value so that
rows export to CSV and JSONL unchanged.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

OUTCOMES = ("masked", "SDC", "DUE")  # OCP terms, see DESIGN section 4
KINDS = ("clean", "injected")


@dataclass
class TrialRecord:
    trial_id: str  # stable hash of (config_id, run_index, sample, fault); primary key
    config_id: str  # stable hash of the ExperimentConfig that produced the trial
    exp_name: str
    model: str
    dataset: str
    dtype: str  # "float32", "bfloat16", "float16"
    seed: int
    run_index: int  # which repetition / sample of the config
    kind: str  # "clean" or "injected"
    reference: str = "online"  # "online" (one pass) or "baseline" (seed: clean-run bounds)
    fault_model: str | None = None  # "bitflip", "multibit", "probabilistic"
    layer: int | None = None
    location: str | None = None  # q, k, v, scores, weights, out
    bit: int | None = None  # lowest flipped bit; bits holds all of them
    bits: str | None = None  # JSON list of flipped bits
    index: str | None = None  # JSON list: (b, h, i, j) or (b, h, i, d)
    value_before: float | None = None
    value_after: float | None = None
    clean_loss: float | None = None
    injected_loss: float | None = None
    loss_delta: float | None = None  # injected_loss - clean_loss
    output_rel_diff: float | None = None  # max |y' - y| / max(|y|) over the model output
    outcome: str | None = None  # one of OUTCOMES ("masked" for clean trials)
    detected: int = 0  # 1 if any enabled check flagged this trial
    detected_by: str = "{}"  # JSON {check_name: 0/1}, e.g. {"bounds": 1, "softmax": 0, "abft": 1}
    epsilon: float | None = None  # bound tightness at the faulted row (bounds check only)
    lower: float | None = None
    upper: float | None = None
    margin: float | None = None  # max(lower - eps, eps - upper): > 0 means the bound is violated
    elapsed_s: float | None = None
    extra: str = "{}"  # JSON for anything else (timings, per-site flag counts)

    def to_row(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "TrialRecord":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in row.items() if k in names})

    def detected_map(self) -> dict[str, int]:
        return json.loads(self.detected_by)


def _sql_type(f: dataclasses.Field) -> str:
    t = str(f.type)
    if t.startswith("int"):
        return "INTEGER"
    if t.startswith("float"):
        return "REAL"
    return "TEXT"


TRIAL_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TrialRecord))
TRIAL_SQL_COLUMNS: tuple[tuple[str, str], ...] = tuple(
    (f.name, _sql_type(f)) for f in dataclasses.fields(TrialRecord)
)
