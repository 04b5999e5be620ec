"""A fake sweep for the store's crash and shard tests: deterministic trials, resumable.

Run as ``python tests/fake_sweep.py STORE --n 200 --batch 4 --sleep 0.02 [--shard I/N]``; it skips
trials already in STORE, logs the rest a batch (one "forward pass") at a time and prints
``skipped S wrote W``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time

from fxsdc.schema import TrialRecord
from fxsdc.store import ResultsLogger, parse_shard, shard_of


def fake_record(i: int) -> TrialRecord:
    """Trial ``i``: every field filled with a value derived from ``i`` alone (NaN, inf included)."""
    bit = i % 32
    outcome = ("masked", "SDC", "DUE")[i % 3]
    flags = {"bounds": int(i % 5 == 0), "abft": int(i % 7 == 0)}
    return TrialRecord(
        trial_id=hashlib.sha256(f"fake-{i}".encode()).hexdigest()[:16],
        config_id="fakecfg",
        exp_name="fake",
        model="tiny-gpt2",
        dataset="fallback",
        dtype="float32",
        seed=42,
        run_index=i,
        kind="clean" if i % 10 == 9 else "injected",
        fault_model="bitflip",
        layer=i % 2,
        location=("q", "k", "v", "scores", "weights", "out")[i % 6],
        bit=bit,
        bits=json.dumps([bit]),
        index=json.dumps([0, i % 4, i % 16, (3 * i) % 16]),
        value_before=i / 7,
        value_after=math.nan if outcome == "DUE" else i * 1.5e30,
        clean_loss=3.25,
        injected_loss=math.inf if outcome == "DUE" else 3.25 + i / 1000,
        loss_delta=math.inf if outcome == "DUE" else i / 1000,
        output_rel_diff=i / 3,
        outcome=outcome,
        detected=int(any(flags.values())),
        detected_by=json.dumps(flags),
        epsilon=0.1 * i,
        lower=0.0,
        upper=1.0,
        margin=-0.5,
        elapsed_s=0.001 * i,
        extra=json.dumps({"pass": i // 4}),
    )


def run(
    path: str, n: int, batch: int = 4, sleep: float = 0.0, shard: tuple[int, int] | None = None
) -> tuple[int, int]:
    """Log trials 0..n-1 (of ``shard`` only, if given) that the store lacks; (skipped, written)."""
    with ResultsLogger(path) as store:
        done = store.done_ids()
        todo = [
            r
            for r in map(fake_record, range(n))
            if shard is None or shard_of(r.trial_id, shard[1]) == shard[0]
        ]
        pending = [r for r in todo if r.trial_id not in done]
        written = 0
        for start in range(0, len(pending), batch):
            time.sleep(sleep)  # stands in for a forward pass
            written += store.log_many(pending[start : start + batch])
    return len(todo) - len(pending), written


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("store")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--shard", type=parse_shard, default=None)
    args = parser.parse_args()
    skipped, written = run(args.store, args.n, args.batch, args.sleep, args.shard)
    print(f"skipped {skipped} wrote {written}", flush=True)


if __name__ == "__main__":
    main()
