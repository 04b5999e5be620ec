#!/usr/bin/env python
"""Overhead and throughput benchmark of fxsdc's instrumentation.

Everything is measured in one run and reported as a ratio to the uninstrumented traced model
(``Instrumented.original``, sharing the weights) measured in the same run: absolute times on a
shared machine are not comparable across runs. For each variant

    original | instrumented, faults off, no checks | + bounds | + softmax | + abft | + all checks
    | all checks without injection nodes | stored-logits (the original with its logits stored as
    a checked layer stores them, no check: the checks' cost is also reported over it)

eagerly and through ``torch.compile`` (compiled variants compare against the compiled original;
all, the original included, compile through ``fxsdc.pipeline.compile_module``, the same options),
every variant runs twice untimed (its first call, which compiles, and its memory pass), then
``--warmup`` untimed rounds and ``--eager-repeats`` / ``--repeats`` timed rounds. A round runs
every variant of a mode once, in an order rotated (and reversed every other round) from round to
round, so that drift and neighbours' load hit all variants alike; a variant's ratio is the median
over rounds of its time divided by its reference's time in the same round (paired), with the
min-max over rounds. On CPUs the process CPU time of each pass is recorded too: its ratio is less
sensitive to other processes on a shared machine (not to their use of caches and memory
bandwidth), a cross-check of the wall-clock ratio on which the verdicts rest.

Compiling the instrumented 12-layer GPT-2 takes minutes per variant on a 2-core CPU, so on CPUs
the compiled variants use a ``--compile-layers`` model (default 2) and the run also times the
compiled ``--layers`` original; since the instrumentation lives inside the layers, each compiled
ratio is also extrapolated to ``--layers`` from its extra time per layer (see ``extrapolate``).
The output says so whenever the layer counts differ.

Peak memory (one extra pass per variant):
- CPU: the peak of live bytes allocated through PyTorch's CPU allocator during one forward pass,
  read from ``torch.profiler(profile_memory=True)`` allocation events (``total_allocated``, which
  counts the bytes allocated since the profiler started and not yet freed); it covers every
  allocation, including ones inside kernels and inductor's generated code, and nothing the
  allocator does not see (Python objects, the C++ heap of MKL/oneDNN workspaces). Added to it:
  the bytes of the module's own parameters and buffers (weights, fault table, detector state,
  ABFT checksum vectors, Lambert-W table), so ``peak total`` = resident state + forward peak.
- CUDA: ``torch.cuda.max_memory_allocated`` minus the allocated bytes before the pass, plus the
  same resident bytes.

Sweep throughput (eager, all checks): ``--sweep-batch`` trials, one random single-bit fault per
trial, each in a different batch element, run three ways on the same inputs:
- one trial per pass, same batch: a ``slots=1`` module, one pass per trial over the whole batch
  with only that trial's fault armed (the seed project's protocol);
- one trial per pass, batch 1: a ``slots=1`` module, one pass per trial over that trial's sample;
- many trials per pass: a ``slots=B`` module, every fault armed in one pass.
A trial's result is its sample's per-check flagged-row counts, the fault's before/after values,
its outcome (masked / SDC / DUE-like against a clean pass) and a digest of its sample's logits;
the script asserts that the results are identical between "one, same batch" and "many" (and
reports, without asserting, how many agree with the batch-1 runs, whose GEMMs round differently).
Times include arming the faults, resetting the detector and reading the results.

Targets (issue "Performance"): faults off/no checks compiled <= 1 % over compiled original; all
checks compiled <= 10 % (CPU) / 5 % (GPU); peak memory with all checks <= 5 % over the original;
many-trials-per-pass >= 10x one-per-pass at batch 16+. Each is reported with the measured value;
a time ratio also with the 95 % bootstrap interval of its median over rounds, and it is "met" only
if the whole interval is within the limit, "MISSED" if it is all beyond, else "unresolved" (the
machine was too noisy to tell). A missed time or memory target gets a torch.profiler table of
its top ops.

Examples:
    python tools/bench.py --json bench.json                       # CPU, float32, batch 4, seq 256
    python tools/bench.py --device cuda --dtype bfloat16 --batch 8 --seq 1024 --json bench-gpu.json
    python tools/bench.py --quick --no-compile --json /tmp/b.json # tiny model, seconds
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Dynamo first (DESIGN section 6): HF's tracer patches torch.finfo while it runs.
import torch
import torch._dynamo  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import transformers  # noqa: E402
from tabulate import tabulate  # noqa: E402
from torch import fx  # noqa: E402

import fxsdc  # noqa: E402
import fxsdc.checks  # noqa: E402
from fxsdc import models  # noqa: E402
from fxsdc.bits import layout  # noqa: E402
from fxsdc.faults import Fault  # noqa: E402
from fxsdc.pipeline import compare_outputs, compile_module  # noqa: E402
from passes.graph_utils import clone_graph_module  # noqa: E402
from passes.insert_checks import store_logits  # noqa: E402
from passes.match_attention import LOCATIONS, match_attention  # noqa: E402

ALL_CHECKS = ("bounds", "softmax", "abft")
CHECK_SETS: dict[str, tuple[str, ...]] = {"none": (), "bounds": ("bounds",),
                                          "softmax": ("softmax",), "abft": ("abft",),
                                          "all": ALL_CHECKS, "all-noinject": ALL_CHECKS,
                                          "stored-logits": ()}
NO_INJECTION = {"all-noinject"}  # checks only, no injection nodes: the deployable detector
# The original with its logits stored as a checked layer stores them (no checks, no injection
# nodes): how much of a checked model's time is the store's effect on the model's own softmax.
STORED_LOGITS = "stored-logits"
MASKED_ATOL = 1e-3  # |logit change| at or below this: the fault was masked (bench convention)
T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[bench {time.perf_counter() - T0:7.1f}s] {message}", file=sys.stderr, flush=True)


# -- machine ------------------------------------------------------------------------------------
def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def source_commit() -> str | None:
    """The checkout's commit, with "-dirty" when tracked files differ from it: which code a
    result belongs to; None outside a git checkout."""
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(repo), "diff", "--quiet", "HEAD"],
                               capture_output=True, timeout=10).returncode != 0
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty else "") if head.returncode == 0 else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- models and inputs --------------------------------------------------------------------------
def build_model(quick: bool, layers: int | None, dtype: torch.dtype) -> tuple[torch.nn.Module, str]:
    """GPT-2 small (random weights offline) or its tiny variant, cut to ``layers`` layers."""
    loaded = models.load_model("gpt2", tiny=quick, dtype=dtype)
    model = loaded.model
    full = model.config.n_layer
    if layers is not None and layers != full:
        if not 1 <= layers <= full:
            raise SystemExit(f"--layers must lie in 1..{full}")
        model.transformer.h = model.transformer.h[:layers]
        model.config.n_layer = layers
    return model.eval(), loaded.source


def make_inputs(vocab: int, batch: int, seq: int, device: torch.device,
                seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    return {"input_ids": ids.to(device),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long, device=device)}


def resident_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct storages behind a module's parameters and buffers."""
    seen: dict[tuple[str, int], int] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        storage = t.untyped_storage()
        seen[(str(t.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


# -- variants -----------------------------------------------------------------------------------
@dataclasses.dataclass
class Variant:
    name: str  # e.g. "compiled/all"
    mode: str  # eager | compiled
    checks: str  # original | none | bounds | softmax | abft | all
    layers: int
    module: Callable[..., Any]  # what is called
    base: torch.nn.Module  # the GraphModule behind it (resident bytes)
    reference: str  # name of the variant it is compared with
    inputs: dict[str, torch.Tensor]
    result: Any = None  # the Instrumented object (None for originals and stored-logits)
    compile_s: float | None = None
    times: list[float] = dataclasses.field(default_factory=list)
    ratios: list[float] = dataclasses.field(default_factory=list)
    cpu_times: list[float] = dataclasses.field(default_factory=list)  # process CPU time
    cpu_ratios: list[float] = dataclasses.field(default_factory=list)
    loads: list[float] = dataclasses.field(default_factory=list)  # 1-min load after each round
    memory: dict[str, float] = dataclasses.field(default_factory=dict)
    bitwise_equal: bool | None = None
    clean_flagged: int | None = None
    extrapolated: float | None = None  # estimated ratio for the full model (see extrapolate)
    extrapolated_rounds: list[float] = dataclasses.field(default_factory=list)
    error: str | None = None

    def __call__(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return self.module(**self.inputs)


def instrument_all(model: torch.nn.Module, device: torch.device, batch: int,
                   keys: list[str]) -> tuple[fx.GraphModule, dict[str, Any]]:
    """The traced original and one instrumented module per check set (faults off)."""
    results: dict[str, Any] = {}
    original = None
    for key in keys:
        if key == STORED_LOGITS:
            continue
        checks = CHECK_SETS[key]
        start = time.perf_counter()
        result = fxsdc.instrument(model, checks=list(checks), slots=1,
                                  **({"locations": []} if key in NO_INJECTION else {}))
        result.gm.to(device)
        result.original.to(device)
        result.detector.reset(batch)
        results[key] = result
        original = original or result.original
        log(f"instrumented checks={key} in {time.perf_counter() - start:.1f}s "
            f"({len(result.checks)} check nodes, {len(result.sites)} sites)")
    if STORED_LOGITS in keys:
        if original is None:
            original = fxsdc.instrument(model, checks=[], locations=[]).original.to(device)
        results[STORED_LOGITS] = with_stored_logits(original)
    return original, results


def with_stored_logits(original: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``original`` whose every softmax reads its logits from a store, as in a layer
    with checks (``passes.insert_checks.store_logits``), with no check and no injection node."""
    gm = clone_graph_module(original)
    for site in match_attention(gm):
        store_logits(gm, site)
    gm.graph.lint()
    gm.recompile()
    return gm


def make_variants(mode: str, original: fx.GraphModule, results: dict[str, Any], layers: int,
                  inputs: dict[str, torch.Tensor]) -> list[Variant]:
    ref = f"{mode}/original"
    wrap = compile_module if mode == "compiled" else (lambda m: m)
    out = [Variant(ref, mode, "original", layers, wrap(original), original, ref, inputs)]
    for key, result in results.items():
        gm = result if isinstance(result, fx.GraphModule) else result.gm
        out.append(Variant(f"{mode}/{key}", mode, key, layers, wrap(gm), gm, ref, inputs,
                           None if gm is result else result))
    return out


def first_call(variant: Variant, device: torch.device) -> dict[str, torch.Tensor] | None:
    """Run once (compiling compiled variants), recording compile time or the error."""
    start = time.perf_counter()
    try:
        out = variant()
        sync(device)
    except Exception as exc:  # keep measuring the other variants; reported and exit 1
        variant.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        log(f"{variant.name}: FAILED {variant.error}")
        return None
    if variant.mode == "compiled":
        variant.compile_s = time.perf_counter() - start
        log(f"{variant.name}: compiled + first pass in {variant.compile_s:.1f}s")
    return out


def outputs_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return compare_outputs(a, b)[0]


# -- memory -------------------------------------------------------------------------------------
def peak_forward_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak live bytes allocated during ``fn()`` (see the module docstring)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del out
        return peak
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    # total_allocated counts what the allocator handed out while a profiler was recording and
    # has not seen freed, including leftovers of earlier sessions (their frees go unrecorded):
    # measure from the level before this session's first allocation.
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.typed[0] == _EventType.Allocation:
            events.append((event.start_time_ns, event.typed[1]))
    if not events:
        return 0
    events.sort(key=lambda e: e[0])
    first = events[0][1]
    base = first.total_allocated - first.alloc_size
    return max(e.total_allocated for _, e in events) - base


def measure_memory(variant: Variant, device: torch.device) -> None:
    transient = peak_forward_bytes(variant, device)
    resident = resident_bytes(variant.base)
    variant.memory = {"resident_bytes": resident, "forward_peak_bytes": transient,
                      "peak_total_bytes": resident + transient}


# -- profiles -----------------------------------------------------------------------------------
def profile_table(fn: Callable[[], Any], device: torch.device, rows: int = 15,
                  sort: str | None = None) -> str:
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    with profile(activities=activities, profile_memory=sort == "memory") as prof:
        fn()
        sync(device)
    key = {"memory": "self_cpu_memory_usage" if device.type != "cuda"
           else "self_cuda_memory_usage"}.get(sort or "", "self_cuda_time_total"
                                                if device.type == "cuda"
                                                else "self_cpu_time_total")
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=110)


def kernel_profiled_copy(variant: Variant) -> Callable[[], Any]:
    """A compiled copy of ``variant`` whose inductor C++ kernels carry profiler names (a fresh
    GraphModule class, so dynamo compiles it again with the option on)."""
    import torch._inductor.config as inductor_config
    gm = fx.GraphModule(variant.base, copy.deepcopy(variant.base.graph))
    with inductor_config.patch({"cpp.enable_kernel_profile": True}), torch.no_grad():
        compiled = compile_module(gm)
        compiled(**variant.inputs)

    def run() -> Any:
        with torch.no_grad():
            return compiled(**variant.inputs)
    return run


# -- timing -------------------------------------------------------------------------------------
def time_rounds(variants: list[Variant], warmup: int, repeats: int,
                device: torch.device) -> None:
    live = [v for v in variants if v.error is None]
    for r in range(warmup + repeats):
        shift = r % len(live)
        order = live[shift:] + live[:shift]
        if r % 2:
            order.reverse()
        times: dict[str, float] = {}
        cpu: dict[str, float] = {}
        for v in order:
            sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            out = v()
            sync(device)
            times[v.name] = time.perf_counter() - start
            cpu[v.name] = time.process_time() - start_cpu
            del out
        if r < warmup:
            log(f"warm-up round {r + 1}/{warmup} done")
            continue
        for v in live:
            v.times.append(times[v.name])
            v.cpu_times.append(cpu[v.name])
            if v.reference in times:
                v.ratios.append(times[v.name] / times[v.reference])
                v.cpu_ratios.append(cpu[v.name] / max(cpu[v.reference], 1e-9))
        load = os.getloadavg()[0]
        for v in live:
            v.loads.append(load)
        log(f"round {r - warmup + 1}/{repeats}: "
            + ", ".join(f"{n} {t * 1e3:.0f}ms" for n, t in sorted(times.items()))
            + f" (load average {load:.1f})")


# -- sweep --------------------------------------------------------------------------------------
def _digest(t: torch.Tensor) -> str:
    data = t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
    return hashlib.sha1(data).hexdigest()[:16]


def _num(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


def trial_result(result: Any, logits: torch.Tensor, clean: torch.Tensor, sample: int,
                 slot: int) -> dict[str, Any]:
    """What one trial (one fault in ``sample``) produced, comparable across runs: the detector's
    flagged rows of that sample, the fault's before/after values and the outcome class."""
    readings = result.detector.read()
    applied = result.faults.applied()[slot]
    row, ref = logits[sample], clean[sample]
    finite = bool(torch.isfinite(row).all())
    diff = float((row - ref).abs().amax()) if finite else math.inf
    outcome = "DUE" if not finite else ("masked" if diff <= MASKED_ATOL else "SDC")
    per_check: dict[str, bool] = {}
    for reading in readings:
        per_check[reading.info.check] = per_check.get(reading.info.check, False) or \
            reading.per_sample[sample] > 0
    return {"fault": {"layer": applied["layer"], "location": applied["location"],
                      "index": applied["index"][1:], "bits": applied["bits"]},
            "before": _num(applied["before"]), "after": _num(applied["after"]),
            "flagged_rows": [r.per_sample[sample] for r in readings],
            "detected": per_check, "outcome": outcome, "max_logit_change": _num(diff)}


def random_faults(result: Any, n: int, seq: int, dtype: torch.dtype, layers: int,
                  seed: int = 1) -> list[Fault]:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    width = layout(dtype).width
    return [result.faults.random_fault(rng.randrange(layers), rng.choice(LOCATIONS),
                                       (rng.randrange(width),), b, seq, gen) for b in range(n)]


def run_sweep(model: torch.nn.Module, layers: int, batch: int, seq: int, repeats: int,
              device: torch.device, dtype: torch.dtype, profile: bool) -> dict[str, Any]:
    vocab = model.config.vocab_size
    x = make_inputs(vocab, batch, seq, device, seed=2)
    one = fxsdc.instrument(model, checks=list(ALL_CHECKS), slots=1)
    many = fxsdc.instrument(model, checks=list(ALL_CHECKS), slots=batch)
    for r in (one, many):
        r.gm.to(device)
        r.original.to(device)
    faults = random_faults(many, batch, seq, dtype, layers)
    with torch.no_grad():
        clean = one.original(**x)["logits"]
        clean_b1 = [one.original(**{k: v[b:b + 1] for k, v in x.items()})["logits"]
                    for b in range(batch)]

    def one_trial(b: int) -> tuple[float, dict[str, Any]]:
        sync(device)
        start = time.perf_counter()
        one.faults.set_faults([faults[b]], batch, seq)
        one.detector.reset(batch)
        with torch.no_grad():
            logits = one.gm(**x)["logits"]
        res = trial_result(one, logits, clean, b, 0)
        elapsed = time.perf_counter() - start
        res["logits_digest"] = _digest(logits[b])  # verification only, not timed
        return elapsed, res

    def one_trial_b1(b: int) -> tuple[float, dict[str, Any]]:
        f = faults[b]
        xb = {k: v[b:b + 1] for k, v in x.items()}
        sync(device)
        start = time.perf_counter()
        one.faults.set_faults([Fault(f.layer, f.location, (0,) + f.index[1:], f.bits)], 1, seq)
        one.detector.reset(1)
        with torch.no_grad():
            logits = one.gm(**xb)["logits"]
        res = trial_result(one, logits, clean_b1[b], 0, 0)
        return time.perf_counter() - start, res

    def many_pass() -> tuple[float, list[dict[str, Any]]]:
        sync(device)
        start = time.perf_counter()
        many.faults.set_faults(faults, batch, seq)
        many.detector.reset(batch)
        with torch.no_grad():
            logits = many.gm(**x)["logits"]
        res = [trial_result(many, logits, clean, b, b) for b in range(batch)]
        elapsed = time.perf_counter() - start
        for b, r in enumerate(res):
            r["logits_digest"] = _digest(logits[b])  # verification only, not timed
        return elapsed, res

    # warm-up (first passes allocate), then interleave: the batch's trials are split into
    # `repeats` chunks of one-per-pass trials (same batch and batch 1), each followed by one
    # many-trials pass.
    one_trial(0), one_trial_b1(0), many_pass()
    one_times, b1_times, many_times = [], [], []
    one_results: list[dict[str, Any]] = [{}] * batch
    b1_results: list[dict[str, Any]] = [{}] * batch
    many_results: list[list[dict[str, Any]]] = []
    chunks = [list(range(batch))[i::repeats] for i in range(repeats)]
    for chunk in chunks:
        for b in chunk:
            t, one_results[b] = one_trial(b)
            one_times.append(t)
            t, b1_results[b] = one_trial_b1(b)
            b1_times.append(t)
        t, res = many_pass()
        many_times.append(t)
        many_results.append(res)
        log(f"sweep: one/pass {statistics.median(one_times):.2f}s, batch-1 "
            f"{statistics.median(b1_times):.2f}s, many/pass {t:.2f}s")
    stable = all(json.dumps(r) == json.dumps(many_results[0]) for r in many_results)
    identical = json.dumps(one_results) == json.dumps(many_results[0])
    keys = ("detected", "outcome")
    b1_agree = sum(all(a[k] == b[k] for k in keys) for a, b in zip(b1_results, many_results[0]))
    tps_one = 1 / statistics.median(one_times)
    tps_b1 = 1 / statistics.median(b1_times)
    tps_many = batch / statistics.median(many_times)
    profiles = {}
    if profile and batch >= 16 and tps_many < 10 * max(tps_one, tps_b1):
        # a missed throughput target: one pass of each mode with its faults armed
        profiles["sweep: many trials/pass"] = profile_table(lambda: many_pass(), device)
        profiles["sweep: one trial/pass, same batch"] = profile_table(lambda: one_trial(0),
                                                                      device)
        profiles["sweep: one trial/pass, batch 1"] = profile_table(lambda: one_trial_b1(0),
                                                                   device)
    many.faults.clear()
    one.faults.clear()
    return {"batch": batch, "seq": seq, "layers": layers, "checks": list(ALL_CHECKS),
            "mode": "eager",
            "one_per_pass": {"slots": 1, "pass_batch": batch, "passes": len(one_times),
                             "pass_times_s": one_times, "trials_per_s": tps_one},
            "one_per_pass_batch1": {"slots": 1, "pass_batch": 1, "passes": len(b1_times),
                                    "pass_times_s": b1_times, "trials_per_s": tps_b1},
            "many_per_pass": {"slots": batch, "pass_batch": batch, "passes": len(many_times),
                              "pass_times_s": many_times, "trials_per_s": tps_many},
            "speedup_vs_one_per_pass": tps_many / tps_one,
            "speedup_vs_batch1": tps_many / tps_b1,
            "identical": identical and stable,
            "batch1_agreement": f"{b1_agree}/{batch} trials agree on detection and outcome",
            "outcomes": {o: sum(r["outcome"] == o for r in many_results[0])
                         for o in ("masked", "SDC", "DUE")},
            "trials": many_results[0], "one_per_pass_trials": one_results,
            "profiles": profiles}


# -- report -------------------------------------------------------------------------------------
def summary(v: Variant) -> dict[str, Any]:
    med = statistics.median(v.times) if v.times else None
    return {"mode": v.mode, "checks": v.checks, "layers": v.layers, "reference": v.reference,
            "median_s": med, "times_s": v.times,
            "ratio": statistics.median(v.ratios) if v.ratios else None,
            "ratio_min": min(v.ratios) if v.ratios else None,
            "ratio_max": max(v.ratios) if v.ratios else None,
            "ratio_ci95": list(median_ci(v.ratios)) if len(v.ratios) > 1 else None,
            "ratio_extrapolated": v.extrapolated,
            "ratio_extrapolated_ci95": (list(median_ci(v.extrapolated_rounds))
                                        if len(v.extrapolated_rounds) > 1 else None),
            "cpu_times_s": v.cpu_times, "round_load_average": v.loads,
            "cpu_time_ratio": statistics.median(v.cpu_ratios) if v.cpu_ratios else None,
            "compile_s": v.compile_s,
            "bitwise_equal_to_reference": v.bitwise_equal,
            "clean_rows_flagged": v.clean_flagged, **v.memory, "error": v.error}


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2 ** 20:.1f}"


def extrapolate(variants: list[Variant], full: Variant, full_layers: int) -> None:
    """Estimate each compiled variant's ratio for the ``full_layers`` model from its run at fewer
    layers: instrumentation lives inside the layers, so its extra time per layer is
    (t_variant - t_original) / layers, paired per round, and the full model's estimated ratio is
    1 + full_layers * extra_per_layer / t_original(full_layers), median over rounds."""
    for v in variants:
        ref = next(r for r in variants if r.name == v.reference)
        if v is full or not v.times or len(v.times) != len(full.times):
            continue
        est = [1 + full_layers * (tv - tr) / v.layers / tf
               for tv, tr, tf in zip(v.times, ref.times, full.times)]
        v.extrapolated = statistics.median(est)
        v.extrapolated_rounds = est


def median_ci(values: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of the median of ``values`` (fixed seed: the same
    rounds give the same interval). With single rounds spreading +-30 % on a shared machine,
    the interval, not the median alone, says whether a target is met."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values)))
                     for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def verdict(values: list[float], limit: float) -> bool | None:
    """Met (True) if the whole 95 % interval of the median is within ``limit``, missed (False)
    if it is all beyond, unresolved (None) if it straddles the limit."""
    lo, hi = median_ci(values)
    return True if hi <= limit else False if lo > limit else None


def verdict_text(target: dict[str, Any]) -> str:
    """A target's verdict as printed: an interval across a limit is unresolved; a value with
    no limit (informative) has none."""
    if target["met"] is not None:
        return "met" if target["met"] else "MISSED"
    informative = target["limit"] == "(none)" or "CI" not in (target["measured"] or "")
    return "-" if informative else "unresolved"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batch", type=int, default=None, help="default 4 (CPU), 8 (CUDA)")
    ap.add_argument("--seq", type=int, default=None, help="default 256 (CPU), 1024 (CUDA)")
    ap.add_argument("--layers", type=int, default=None,
                    help="GPT-2 layers of the eager variants (default all 12)")
    ap.add_argument("--compile-layers", type=int, default=None,
                    help="layers of the model the compiled variants use (default: 2 on CPU, "
                         "where compiling an instrumented 12-layer model takes minutes per "
                         "variant; --layers on CUDA); with fewer layers than --layers the "
                         "compiled original at --layers is timed too and ratios are also "
                         "extrapolated to --layers")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed rounds of the compiled variants (default 7; 3 with --quick)")
    ap.add_argument("--eager-repeats", type=int, default=None,
                    help="timed rounds of the eager variants (default 3 on CPU, else --repeats)")
    ap.add_argument("--warmup", type=int, default=0,
                    help="untimed rounds before timing (default 0: every variant has already "
                         "run twice, its first call (compiling) and its memory pass)")
    ap.add_argument("--no-compile", action="store_true", help="eager variants only")
    ap.add_argument("--only", default=None,
                    help="comma-separated check sets to run (of " + ",".join(CHECK_SETS)
                         + "; the original always runs), e.g. none,all")
    ap.add_argument("--sweep-batch", type=int, default=16)
    ap.add_argument("--sweep-seq", type=int, default=None,
                    help="sequence length of the sweep (default 64 CPU, 256 CUDA, 16 --quick)")
    ap.add_argument("--sweep-layers", type=int, default=None, help="default --layers")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-profile", action="store_true", help="skip profiles of missed targets")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's, i.e. the cores; 1 with "
                         "--quick, whose tiny ops suffer most from oversubscribed cores)")
    ap.add_argument("--eager-slice-elements", type=int, default=None,
                    help="size of the slices the eager checks run on (fxsdc.checks."
                         "EAGER_SLICE_ELEMENTS, default %d); a huge value runs them whole"
                         % fxsdc.checks.EAGER_SLICE_ELEMENTS)
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--quick", action="store_true",
                    help="tiny 2-layer GPT-2, batch 2, seq 32, sweep seq 16, 3 rounds: seconds")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    dtype = getattr(torch, args.dtype)
    cuda = device.type == "cuda"
    batch = args.batch or (2 if args.quick else 8 if cuda else 4)
    seq = args.seq or (32 if args.quick else 1024 if cuda else 256)
    repeats = args.repeats or (3 if args.quick else 7)
    eager_repeats = args.eager_repeats or (3 if not cuda else repeats)
    sweep_seq = args.sweep_seq or (16 if args.quick else 256 if cuda else 64)
    if args.threads or args.quick:
        torch.set_num_threads(args.threads or 1)
    if args.eager_slice_elements is not None:
        if args.eager_slice_elements < 1:
            raise SystemExit("--eager-slice-elements must be at least 1")
        fxsdc.checks.EAGER_SLICE_ELEMENTS = args.eager_slice_elements
    if cuda:
        fxsdc.checks.use_float32_gemm_accumulation()  # what the ABFT tolerances assume
    torch.manual_seed(0)
    load_start = os.getloadavg()
    meta: dict[str, Any] = {
        "argv": sys.argv[1:] if argv is None else argv, "commit": source_commit(),
        "device": str(device),
        "machine": machine_name(device), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "dtype": args.dtype, "batch": batch, "seq": seq, "repeats": repeats,
        "eager_repeats": eager_repeats, "warmup_rounds": args.warmup, "quick": args.quick,
        "eager_slice_elements": fxsdc.checks.EAGER_SLICE_ELEMENTS,
        "cuda_reduced_precision_reduction": (
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction if cuda else None),
        "load_average_start": load_start,
        "memory_method": ("torch.cuda.max_memory_allocated - allocated before the pass, + the "
                          "module's parameter/buffer bytes" if cuda else
                          "torch.profiler(profile_memory=True) allocator peak during the pass "
                          "(total_allocated of allocation events), + the module's "
                          "parameter/buffer bytes"),
        "timing_method": "per round every variant of a mode once, order rotated and reversed "
                         "every other round; ratio = median over rounds of t/t_reference "
                         "(same round); two untimed passes per variant before timing",
    }

    # -- variants --
    model, source = build_model(args.quick, args.layers, dtype)
    layers = model.config.n_layer
    meta.update(model=f"gpt2{' (tiny)' if args.quick else ''}", model_source=source,
                layers=layers, vocab=model.config.vocab_size)
    x = make_inputs(model.config.vocab_size, batch, seq, device)
    log(f"{meta['machine']}: gpt2 {layers} layers, {args.dtype}, batch {batch}, seq {seq}")
    keys = list(CHECK_SETS) if not args.only else args.only.split(",")
    if unknown := [k for k in keys if k not in CHECK_SETS]:
        raise SystemExit(f"--only: unknown check set {unknown[0]!r}; choose from "
                         + ",".join(CHECK_SETS))
    meta["check_sets"] = keys
    original, results = instrument_all(model, device, batch, keys)
    model.to(device)
    eager = make_variants("eager", original, results, layers, x)
    compiled: list[Variant] = []
    compile_layers = None
    full: Variant | None = None
    if not args.no_compile:
        compile_layers = min(args.compile_layers or (layers if cuda or args.quick else 2),
                             layers)
        if compile_layers != layers:
            cmodel, _ = build_model(args.quick, compile_layers, dtype)
            coriginal, cresults = instrument_all(cmodel, device, batch, keys)
            cmodel.to(device)
            compiled = make_variants("compiled", coriginal, cresults, compile_layers, x)
            name = f"compiled/original@{layers}"
            full = Variant(name, "compiled", "original", layers, compile_module(original),
                           original, name, x)
            compiled.append(full)
        else:
            compiled = make_variants("compiled", original, results, layers, x)
    meta["compile_layers"] = compile_layers
    variants = eager + compiled
    by_name = {v.name: v for v in variants}

    outputs: dict[str, dict[str, torch.Tensor]] = {}
    for v in variants:
        out = first_call(v, device)
        if out is not None:
            outputs[v.name] = out
    for v in variants:
        if v.name in outputs and v.reference in outputs and v.reference != v.name:
            v.bitwise_equal = outputs_equal(outputs[v.name], outputs[v.reference])
    del outputs
    for v in variants:
        if v.error is None:
            measure_memory(v, device)
            log(f"{v.name}: peak {mib(v.memory['peak_total_bytes'])} MiB "
                f"(forward {mib(v.memory['forward_peak_bytes'])} MiB)")
    for v in variants:
        if v.result is not None:
            v.result.detector.reset(batch)
    time_rounds(eager, args.warmup, eager_repeats, device)
    if compiled:
        time_rounds(compiled, args.warmup, repeats, device)
    if full is not None and full.error is None:
        extrapolate(compiled, full, layers)
    for v in variants:
        if v.result is not None and v.error is None:
            v.clean_flagged = v.result.detector.total_flagged() if v.result.checks else 0
    for v in variants:
        ref = by_name[v.reference]
        if v.memory and ref.memory:
            v.memory["peak_total_ratio"] = v.memory["peak_total_bytes"] / \
                ref.memory["peak_total_bytes"]
            v.memory["forward_peak_ratio"] = v.memory["forward_peak_bytes"] / \
                max(ref.memory["forward_peak_bytes"], 1)

    # -- sweep --
    sweep = None
    if not args.no_sweep:
        sweep_layers = args.sweep_layers or layers
        smodel = model if sweep_layers == layers else build_model(args.quick, sweep_layers,
                                                                  dtype)[0].to(device)
        log(f"sweep: {args.sweep_batch} trials, batch {args.sweep_batch}, seq {sweep_seq}, "
            f"{sweep_layers} layers, all checks, eager")
        sweep = run_sweep(smodel, sweep_layers, args.sweep_batch, sweep_seq,
                          max(1, min(repeats, args.sweep_batch)), device, dtype,
                          profile=not args.no_profile)

    # -- targets --
    targets: list[dict[str, Any]] = []
    profiles: dict[str, str] = {}

    def add_profile(v: Variant, kind: str) -> None:
        if args.no_profile:
            return
        if kind == "memory":
            for w in (v, by_name[v.reference]):
                if f"{w.name} (memory)" not in profiles:
                    log(f"memory profile of {w.name}")
                    profiles[f"{w.name} (memory)"] = profile_table(w, device, sort="memory")
            return
        for w in (v, by_name[v.reference]):
            if w.name not in profiles:
                log(f"time profile of {w.name}")
                fn = kernel_profiled_copy(w) if w.mode == "compiled" and not cuda else w
                profiles[w.name] = profile_table(fn, device)

    def target(name: str, limit: str, value: float | None, met: bool | None, fmt: str,
               note: str = "") -> None:
        targets.append({"target": name, "limit": limit,
                        "measured": None if value is None else fmt.format(value),
                        "value": value, "met": met, "note": note})

    check_limit = 1.05 if cuda else 1.10
    check_text = f"<= {round(check_limit * 100 - 100)} %"
    for key, label, limit, text in (
            ("none", "faults off, no checks", 1.01, "<= 1 %"),
            ("all", "all online checks", check_limit, check_text),
            ("all-noinject", "all online checks, no injection nodes", check_limit, check_text)):
        v = by_name.get(f"compiled/{key}")
        if v is None:
            target(f"{label}, compiled", text, None, None, "",
                   "not measured (--no-compile)" if args.no_compile else "not run (--only)")
        elif v.ratios:
            r = statistics.median(v.ratios)
            lo, hi = median_ci(v.ratios)
            where = f"{v.layers}-layer model vs compiled original"
            target(f"{label}, compiled", text, (r - 1) * 100, verdict(v.ratios, limit),
                   "{:+.1f} %" + f" (95 % CI {(lo - 1) * 100:+.1f} to {(hi - 1) * 100:+.1f})",
                   where)
            if v.extrapolated is not None:
                e = v.extrapolated
                lo, hi = median_ci(v.extrapolated_rounds)
                target(f"{label}, compiled, extrapolated to {layers} layers", text,
                       (e - 1) * 100, verdict(v.extrapolated_rounds, limit),
                       "{:+.1f} %" + f" (95 % CI {(lo - 1) * 100:+.1f} to {(hi - 1) * 100:+.1f})",
                       f"estimate from the {v.layers}-layer run and the compiled "
                       f"{layers}-layer original")
            if key != "all-noinject" and (r > limit or (v.extrapolated or 0) > limit):
                add_profile(v, "time")
        e = by_name.get(f"eager/{key}")
        if e is not None and e.ratios:
            r = statistics.median(e.ratios)
            target(f"{label}, eager", "(none)", (r - 1) * 100, None, "{:+.1f} %",
                   f"{e.layers}-layer model; informative, the targets are for compiled")
    stored = by_name.get(f"compiled/{STORED_LOGITS}")
    for key, label in (("all", "all online checks"),
                       ("all-noinject", "all online checks, no injection nodes")):
        v = by_name.get(f"compiled/{key}")
        if stored is None or v is None or not v.ratios or len(v.ratios) != len(stored.ratios):
            continue
        over = [a / b for a, b in zip(v.ratios, stored.ratios)]  # same round, same original
        lo, hi = median_ci(over)
        target(f"{label}, compiled, over {STORED_LOGITS}", "(none)",
               (statistics.median(over) - 1) * 100, None,
               "{:+.1f} %" + f" (95 % CI {(lo - 1) * 100:+.1f} to {(hi - 1) * 100:+.1f})",
               "informative: the checks' cost over the original with the same logits store")
    for mode in ("eager", "compiled"):
        v = by_name.get(f"{mode}/all")
        if v and v.memory.get("peak_total_ratio"):
            r = v.memory["peak_total_ratio"]
            target(f"peak memory, all checks, {mode}", "<= 5 %", (r - 1) * 100, r <= 1.05,
                   "{:+.1f} %", f"{v.layers}-layer model; forward-only peak "
                   f"{v.memory['forward_peak_ratio']:.2f}x the original's")
            if r > 1.05:
                add_profile(v, "memory")
    if sweep:
        big = args.sweep_batch >= 16
        for key, label, note in (
                ("speedup_vs_one_per_pass", f"same batch {args.sweep_batch}",
                 "one pass per trial over the same batch, one fault armed"),
                ("speedup_vs_batch1", "batch-1 passes",
                 "stricter: one pass per trial over that trial's sample only")):
            value = sweep[key]
            target(f"many trials/pass vs one/pass ({label})", ">= 10x", value,
                   value >= 10 if big else None, "{:.1f}x",
                   note if big else "batch < 16: no verdict")
        profiles.update(sweep.pop("profiles"))
    meta["load_average_end"] = os.getloadavg()
    meta["wall_s"] = time.perf_counter() - T0

    report = {"meta": meta, "variants": {v.name: summary(v) for v in variants},
              "sweep": sweep, "targets": targets, "profiles": profiles}

    # -- print --
    rows = []
    for v in variants:
        s = summary(v)
        rows.append([v.name, v.layers, "ERROR" if v.error else f"{s['median_s'] * 1e3:.0f}",
                     "-" if s["ratio"] is None else
                     f"{s['ratio']:.3f} ({s['ratio_min']:.2f}-{s['ratio_max']:.2f})",
                     "-" if s["cpu_time_ratio"] is None or cuda else f"{s['cpu_time_ratio']:.3f}",
                     "-" if v.extrapolated is None else f"{v.extrapolated:.3f}",
                     "-" if v.compile_s is None else f"{v.compile_s:.0f}",
                     mib(v.memory.get("peak_total_bytes")),
                     "-" if "peak_total_ratio" not in v.memory else
                     f"{v.memory['peak_total_ratio']:.3f}",
                     mib(v.memory.get("forward_peak_bytes")),
                     "-" if "forward_peak_ratio" not in v.memory else
                     f"{v.memory['forward_peak_ratio']:.2f}",
                     {True: "yes", False: "NO", None: "-"}[v.bitwise_equal],
                     "-" if v.clean_flagged is None else v.clean_flagged])
    print(f"\nfxsdc bench: {meta['machine']} ({meta['cpu_count']} CPUs, "
          f"{meta['torch_threads']} torch threads), {args.dtype}, {meta['model']} {layers} "
          f"layers, batch {batch}, seq {seq}; eager {eager_repeats} rounds"
          + ("" if not compiled else f", compiled {repeats} rounds")
          + (f"\ncompiled variants use a {compile_layers}-layer model (compiling the "
             f"instrumented {layers}-layer model takes minutes per variant here); 'extrap.' "
             f"estimates their ratio for {layers} layers" if full else ""))
    print(tabulate(rows, headers=["variant", "layers", "median ms", "ratio (min-max)",
                                  "cpu-time ratio",
                                  f"extrap. {layers}L", "compile s", "peak MiB",
                                  "peak ratio", "fwd MiB", "fwd ratio", "bitwise =",
                                  "clean flags"]))
    if sweep:
        print(f"\nsweep: {sweep['batch']} trials, seq {sweep['seq']}, {sweep['layers']} layers, "
              f"all checks, eager; outcomes {sweep['outcomes']}")
        srows = [[name, sweep[key]["slots"], sweep[key]["pass_batch"], sweep[key]["passes"],
                  f"{statistics.median(sweep[key]['pass_times_s']) * 1e3:.0f}",
                  f"{min(sweep[key]['pass_times_s']) * 1e3:.0f}",
                  f"{sweep[key]['trials_per_s']:.2f}",
                  f"{sweep[key]['trials_per_s'] / sweep['one_per_pass']['trials_per_s']:.1f}x"]
                 for name, key in (("one trial/pass, same batch", "one_per_pass"),
                                   ("one trial/pass, batch 1", "one_per_pass_batch1"),
                                   ("many trials/pass", "many_per_pass"))]
        print(tabulate(srows, headers=["mode", "slots", "pass batch", "passes",
                                       "median pass ms", "min pass ms", "trials/s",
                                       "vs one/pass"]))
        print(f"trial results identical one/pass vs many/pass: {sweep['identical']}; "
              f"batch-1: {sweep['batch1_agreement']}")
    print()
    print(tabulate([[t["target"], t["limit"], t["measured"] or "-", verdict_text(t), t["note"]]
                    for t in targets], headers=["target", "limit", "measured", "verdict",
                                                "note"]))
    for name, table in profiles.items():
        print(f"\nprofile: {name}\n{table}")
    print(f"\nwall time {meta['wall_s']:.0f}s; load average {load_start[0]:.1f} at start, "
          f"{meta['load_average_end'][0]:.1f} at end")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
        log(f"wrote {args.json}")
    if sweep is not None:
        assert sweep["identical"], "sweep: trial results differ between one and many per pass"
    failed = [v.name for v in variants if v.error]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
