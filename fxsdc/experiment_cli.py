"""``fxsdc run``, ``fxsdc sweep`` and ``fxsdc merge``: experiments from the command line.

``run`` runs one config (flags, or ``--config FILE`` with flags overriding it) and prints a
summary table. ``sweep`` runs a template or a sweep file into a results store; trial ids are
stable, so ``--resume`` continues a killed sweep without repeating or losing a trial, and
``--shard I/N`` (or RANK/WORLD_SIZE under torchrun) runs one part of it into its own store.
``merge`` combines stores.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from .config import ConfigTemplates, ExperimentConfig, ParameterSweepConfig, read_config_file
from .errors import UserError
from .store import ResultsLogger, merge_stores, parse_shard, shard_from_env

if TYPE_CHECKING:  # the runner imports torch: loaded only by the commands that run models
    from .runner import ExperimentResult, SweepProgress

# (flag, config field, argparse type); a flag left out keeps the file's or the default value.
_RUN_FLAGS: tuple[tuple[str, str, Any], ...] = (
    ("--exp-name", "exp_name", str),
    ("--model", "model_name", str),
    ("--dataset", "dataset_name", str),
    ("--location", "injection_location", str),
    ("--bit", "injection_bit", int),
    ("--layers", "injection_layers", "ints"),
    ("--index", "injection_idx", "ints"),
    ("--checks", "checks", "names"),
    ("--reference", "reference", str),
    ("--fault-model", "fault_model", str),
    ("--bits", "bits", "ints"),
    ("--ber", "ber", float),
    ("--batch-size", "batch_size", int),
    ("--seq-length", "seq_length", int),
    ("--num-samples", "num_samples", int),
    ("--num-runs", "num_runs", int),
    ("--trials-per-pass", "trials_per_pass", int),
    ("--seed", "seed", int),
    ("--dtype", "dtype", str),
    ("--device", "device", str),
)


def _ints(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers") from None


def _names(text: str) -> list[str]:
    return [part for part in text.replace(" ", "").split(",") if part]


_TYPES = {"ints": _ints, "names": _names}


# -- fxsdc run ------------------------------------------------------------------------------
def _add_run(sub: Any) -> None:
    p = sub.add_parser("run", help="run one experiment (a config) and print a summary",
                       description="Run one experiment: a clean pass per batch and num_runs "
                       "faults per sample, with the chosen checks.")
    p.add_argument("--config", metavar="FILE", help="JSON or YAML config; flags override it")
    for flag, name, kind in _RUN_FLAGS:
        p.add_argument(flag, dest=name, type=_TYPES.get(kind, kind), default=None,
                       help=f"config field {name}")
    p.add_argument("--tiny", action="store_true", help="the model's small random variant")
    p.add_argument("--compile", action="store_true", help="run through torch.compile")
    p.add_argument("--db", metavar="FILE", help="also store the trials in this results store")
    p.add_argument("--json", action="store_true", help="print the trials as a JSON list")
    p.set_defaults(func=_run)


def _run_config(args: argparse.Namespace) -> ExperimentConfig:
    base = ExperimentConfig.load(args.config).to_dict() if args.config else {}
    given = {name: getattr(args, name) for _, name, _ in _RUN_FLAGS
             if getattr(args, name) is not None}
    for flag in ("tiny", "compile"):
        if getattr(args, flag):
            given[flag] = True
    return ExperimentConfig.from_dict({**base, **given})


def _run(args: argparse.Namespace) -> int:
    from .runner import ExperimentRunner, load_batches, load_model

    config = _run_config(args)
    runner = ExperimentRunner(config)
    store = ResultsLogger(args.db) if args.db else None  # a bad store fails before any pass
    try:
        model = load_model(config)
        batches = load_batches(config, model)
        if store is not None:
            store.save_config(config)
        results: list[ExperimentResult] = []
        for passed in runner.iter_passes(model, batches):
            if store is not None:
                store.log_many(r.to_record() for r in passed)
            results.extend(passed)
    finally:
        if store is not None:
            store.close()
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=1))
    else:
        print(summary(config, results, batches.source))
    return 0


def summary(config: ExperimentConfig, results: Sequence[ExperimentResult], source: str) -> str:
    """A short table: trials per outcome, how many each check detected, mean loss change."""
    from tabulate import tabulate

    from .runner import model_label

    checks = config.active_checks
    rows = []
    for kind, outcome in (("injected", "masked"), ("injected", "SDC"), ("injected", "DUE"),
                          ("clean", "masked")):
        group = [r for r in results if r.kind == kind and r.outcome == outcome]
        if not group and kind == "injected":
            continue
        deltas = [abs(r.loss_delta) for r in group if r.loss_delta is not None]
        finite = [d for d in deltas if math.isfinite(d)]
        rows.append([outcome if kind == "injected" else "clean (no fault)", len(group),
                     sum(r.detected for r in group),
                     *[sum(r.detected_by[c] for r in group) for c in checks],
                     f"{sum(finite) / len(finite):.3g}" if finite else "-"])
    fault = (f"{config.fault_model} at {config.injection_location}, "
             + (f"ber {config.ber}" if config.fault_model == "probabilistic"
                else f"bits {list(config.bits) if config.bits else [config.injection_bit]}"))
    head = (f"{config.exp_name}: {model_label(config)}, {fault}, {config.num_samples} samples x "
            f"{config.num_runs} runs, {config.reference} checks: {', '.join(checks) or 'none'}\n"
            f"data: {source}\n")
    return head + tabulate(rows, headers=["outcome", "trials", "detected", *checks,
                                          "mean |dloss|"])


# -- fxsdc sweep ----------------------------------------------------------------------------
def _add_sweep(sub: Any) -> None:
    p = sub.add_parser("sweep", help="run a sweep of configs into a results store",
                       description="Run every config of a template or sweep file into a results "
                       "store. Rerunning with --resume skips the trials the store holds.")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--template", metavar="NAME",
                      help=f"one of: {', '.join(ConfigTemplates.names())}")
    what.add_argument("--config", metavar="FILE", help="JSON/YAML sweep file: {base_config: "
                      "{...}, sweep_params: {field: [values]}}, or one config")
    p.add_argument("--db", metavar="FILE", required=True, help="results store (SQLite)")
    p.add_argument("--shard", metavar="I/N", help="run shard I of N (default: RANK/WORLD_SIZE "
                   "when torchrun sets them, which also suffixes --db per rank)")
    p.add_argument("--resume", action="store_true", help="continue a sweep the store already "
                   "holds trials of (required then)")
    p.add_argument("--tiny", action="store_true", help="use every model's small random variant")
    p.add_argument("--limit", type=int, metavar="N", help="only the sweep's first N configs")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", dest="overrides",
                   help="set a config field in every config (VALUE as JSON, else text); "
                   "repeatable")
    p.set_defaults(func=_sweep)


def load_sweep(path: str | Path) -> ParameterSweepConfig:
    """A sweep file: ``{base_config: {...}, sweep_params: {...}}``, or one config's fields."""
    path = Path(path)
    content = read_config_file(path, "sweep config")
    try:
        if isinstance(content, dict) and "sweep_params" in content:
            extra = sorted(set(content) - {"base_config", "sweep_params"})
            if extra:
                raise UserError(f"unknown sweep key {extra[0]!r}; keys are base_config, "
                                "sweep_params")
            params = content["sweep_params"]
            if not isinstance(params, dict):
                raise UserError("sweep_params must map field names to lists of values")
            base = ExperimentConfig.from_dict(content.get("base_config") or {})
            return ParameterSweepConfig(base, params)
        return ParameterSweepConfig(ExperimentConfig.from_dict(content), {})
    except UserError as e:
        raise UserError(f"{path}: {e}") from e


def _override(text: str) -> tuple[str, Any]:
    name, sep, raw = text.partition("=")
    if not sep or not name.strip():
        raise UserError(f"--set {text!r}: expected FIELD=VALUE, e.g. num_samples=8")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return name.strip(), value


def _sweep_list(args: argparse.Namespace) -> list[ExperimentConfig]:
    from .runner import sweep_configs

    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be >= 1, not {args.limit}")
    sweep = ConfigTemplates.get(args.template) if args.template else load_sweep(args.config)
    configs = sweep.generate_configs()[: args.limit]
    changes = dict(_override(text) for text in args.overrides)
    if args.tiny:
        changes["tiny"] = True
    if changes:
        configs = [ExperimentConfig.from_dict({**c.to_dict(), **changes}) for c in configs]
    return sweep_configs(configs)


def _shard_and_db(args: argparse.Namespace) -> tuple[tuple[int, int] | None, Path]:
    db = Path(args.db)
    if args.shard:
        return parse_shard(args.shard), db
    shard = shard_from_env()
    if shard is None or shard[1] == 1:
        return None, db
    # Every torchrun rank gets the same arguments: give each its own store.
    return shard, db.with_name(f"{db.stem}.rank{shard[0]}-of-{shard[1]}{db.suffix}")


def _sweep(args: argparse.Namespace) -> int:
    from .runner import batch_samples, planned_ids, run_parameter_sweep, shard_batches

    configs = _sweep_list(args)
    shard, db = _shard_and_db(args)
    with ResultsLogger(db) as store:
        done = store.done_ids()
        if done and not args.resume:
            held = sum(t in done for c in configs for b in shard_batches(c, shard)
                       for t in planned_ids(c, b, batch_samples(c, b)))
            if held:
                raise UserError(f"{db} already holds {held} trials of this sweep; pass --resume "
                                "to continue it, or choose another --db")
        printer = ProgressPrinter(sys.stderr)
        run_parameter_sweep(configs, logger=store, shard=shard, progress=printer)
        printer.finish()
        total = store.count()
    part = f" (shard {shard[0]}/{shard[1]})" if shard else ""
    print(f"{db}: {len(configs)} configs{part}; the store holds {total} trials")
    return 0


class ProgressPrinter:
    """Progress of a sweep on a stream: redrawn in place with \\r on a terminal, otherwise one
    plain line every ``interval`` seconds (logs and CI output stay readable)."""

    def __init__(self, stream: TextIO, interval: float = 5.0) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.interval = 0.2 if self.tty else interval
        self._last = -math.inf
        self._state: SweepProgress | None = None

    @staticmethod
    def line(p: SweepProgress) -> str:
        eta = p.eta_s
        percent = 100.0 * p.done / p.total if p.total else 100.0
        return (f"trials {p.done}/{p.total} ({percent:.0f}%) | {p.rate:.1f} trials/s | "
                f"ETA {_duration(eta) if eta is not None else '?'} | detected {p.detected} | "
                f"clean flagged {p.clean_flagged}")

    def __call__(self, p: SweepProgress) -> None:
        self._state = p
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._emit(p)

    def _emit(self, p: SweepProgress) -> None:
        if self.tty:
            self.stream.write("\r" + self.line(p) + "\x1b[K")
        else:
            self.stream.write(self.line(p) + "\n")
        self.stream.flush()

    def finish(self) -> None:
        """The final state, ending the line."""
        if self._state is not None:
            self._emit(self._state)
            if self.tty:
                self.stream.write("\n")
                self.stream.flush()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


# -- fxsdc merge ----------------------------------------------------------------------------
def _add_merge(sub: Any) -> None:
    p = sub.add_parser("merge", help="combine results stores (shards) into a new store",
                       description="Combine results stores; a trial in several inputs is kept "
                       "once, and differing copies of a trial refuse the merge.")
    p.add_argument("out", metavar="OUT", help="the new store (must not exist)")
    p.add_argument("inputs", nargs="+", metavar="IN", help="stores to combine")
    p.set_defaults(func=_merge)


def _merge(args: argparse.Namespace) -> int:
    n_in, n_out = merge_stores(args.inputs, args.out)
    print(f"{args.out}: merged {n_in} rows from {len(args.inputs)} stores into {n_out} trials")
    return 0


def add_experiment_commands(subparsers: Any) -> None:
    """Register ``run``, ``sweep`` and ``merge`` on the CLI's subparsers (its parser class)."""
    _add_run(subparsers)
    _add_sweep(subparsers)
    _add_merge(subparsers)
