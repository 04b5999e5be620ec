"""Experiments: run configs on an instrumented model, one trial per sample, and store the trials.

A *trial* is one sample of one batch under one fault (``kind="injected"``) or under none
(``kind="clean"``). For each batch the runner makes one clean pass with every fault off: its
outputs are the reference of every injected trial on that batch, and its rows measure false
alarms. Then come the injected passes; each carries up to ``trials_per_pass`` faults, one per
batch element, so one forward pass runs that many independent trials. The fault table and the
detector live in device tensors: the host writes them before a pass and reads them once after it.

Outcome classes (DESIGN section 4): *DUE* when the injected output holds a NaN/Inf where the
clean output is finite, *masked* when ``max |y' - y| / max |y| <= MASKED_REL_TOL``, else *SDC*.

``reference="baseline"`` is the seed's detector: the bounds of the clean run's logits and weights
against the injected run's deviation epsilon, computed on the host at the faulted layer
(:mod:`fxsdc.bounds`). Online checks (``reference="online"``) are nodes inside the graph.

Sweeps (:func:`run_parameter_sweep`) give every trial a stable id, so a rerun skips what a store
already holds, and shard by (config, batch) so that one batch's passes stay in one process.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from passes.match_attention import match_attention

from . import data, models
from .bits import parse_dtype
from .checks import use_float32_gemm_accumulation
from .bounds import (
    BoundsResult,
    compute_attention_bounds,
    compute_injected_epsilon_from_p,
    detect_violation,
)
from .config import LOCATIONS, ExperimentConfig, ParameterSweepConfig
from .errors import UserError
from .faults import Fault
from .pipeline import Instrumented, instrument
from .schema import TrialRecord
from .store import ResultsLogger, shard_of

# The issue defines an SDC as "output changed by more than 1e-3 relative". Rounding noise of a
# clean float32 run is ~1e-7 relative, far below; a flip that moves the output by less than a
# thousandth of its largest value is counted as masked.
MASKED_REL_TOL = 1e-3
# Keys of TrialRecord.extra that are timings: they differ between two runs of the same trial.
TIMING_KEYS = ("pass_s",)
# Probabilistic faults hash the seed's low 32 bits (fxsdc.runtime.random_hits): keep seeds < 2**30.
_PROB_SEED_MOD = 1 << 30


# -- trial identity -------------------------------------------------------------------------
def trial_id(config_id: str, batch_index: int, sample_index: int, run_index: int | None) -> str:
    """Stable id of a trial: a hash of (config, batch, sample in batch, run); run None = clean."""
    key = json.dumps([config_id, batch_index, sample_index, run_index])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def pass_key(config_id: str, batch_index: int) -> str:
    """The shard key: every pass of one batch (clean and injected) lands in the same shard."""
    return f"{config_id}/{batch_index}"


def _derived_seed(*parts: int) -> int:
    """A 60-bit seed from integers, independent of how trials are grouped into passes."""
    return int(hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:15], 16)


def num_batches(config: ExperimentConfig) -> int:
    return -(-config.num_samples // config.batch_size)


def batch_samples(config: ExperimentConfig, batch_index: int) -> int:
    """Samples in batch ``batch_index`` of ``fxsdc.data.make_batches`` (the last may be short)."""
    return min(config.batch_size, config.num_samples - batch_index * config.batch_size)


def planned_ids(config: ExperimentConfig, batch_index: int, size: int) -> list[str]:
    """Ids of every trial (clean, then injected) of one batch of ``size`` samples."""
    runs = range(config.num_runs) if config.injection_enabled else ()
    clean = [trial_id(config.config_id, batch_index, s, None) for s in range(size)]
    return clean + [trial_id(config.config_id, batch_index, s, r) for r in runs
                    for s in range(size)]


# -- outcomes and losses --------------------------------------------------------------------
def output_difference(clean: Mapping[str, Any], injected: Mapping[str, Any]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample (leading dim): ``max |y' - y| / max |y|`` over every output tensor (float64),
    and whether ``y'`` holds a NaN/Inf where ``y`` is finite.

    A value non-finite on one side only is an infinite difference; NaN on both sides, or the same
    infinity, is none. ``0/0`` gives 0 (nothing changed), ``x/0`` infinity."""
    diff = scale = due = None
    for key, y in clean.items():
        if not isinstance(y, torch.Tensor):
            continue
        a = y.detach().double().reshape(y.shape[0], -1)
        b = injected[key].detach().double().reshape(y.shape[0], -1)
        same = (a == b) | (a.isnan() & b.isnan())
        d = torch.where(same, 0.0, (b - a).abs()).nan_to_num(nan=math.inf, posinf=math.inf)
        s = torch.where(a.isfinite(), a.abs(), 0.0)
        fresh = (a.isfinite() & ~b.isfinite()).any(1)
        d, s = d.amax(1), s.amax(1)
        diff = d if diff is None else torch.maximum(diff, d)
        scale = s if scale is None else torch.maximum(scale, s)
        due = fresh if due is None else due | fresh
    if diff is None:
        raise ValueError("the outputs hold no tensor")
    rel = torch.where(diff == 0, 0.0, diff / scale)
    return rel, due


def classify(rel_diff: float, due: bool) -> str:
    """Outcome class of one trial from its output difference (see the module docstring)."""
    if due:
        return "DUE"
    return "masked" if rel_diff <= MASKED_REL_TOL else "SDC"


def classify_outcome(clean: torch.Tensor, injected: torch.Tensor) -> tuple[str, float]:
    """(outcome, relative difference) of one sample's output tensor."""
    rel, due = output_difference({"y": clean.unsqueeze(0)}, {"y": injected.unsqueeze(0)})
    return classify(float(rel[0]), bool(due[0])), float(rel[0])


def sample_losses(task: str, outputs: Mapping[str, torch.Tensor], input_ids: torch.Tensor,
                  attention_mask: torch.Tensor) -> torch.Tensor | None:
    """Mean cross-entropy per sample over its valid tokens; None for an encoder (no LM head).

    causal-lm: next-token prediction. masked-lm: predicting each input token at its own
    position, with no token masked (an inexpensive pseudo-loss that still moves with the
    output). Computed in float32 at least: the logits are the largest tensor of the run.
    """
    if task == "encoder":
        return None
    logits = outputs["logits"]
    logits = logits.float() if logits.dtype != torch.float64 else logits
    valid = attention_mask.bool()
    target = input_ids
    if task == "causal-lm":
        logits, target, valid = logits[:, :-1], input_ids[:, 1:], valid[:, 1:] & valid[:, :-1]
    nll = F.cross_entropy(logits.transpose(1, 2), target, reduction="none").double()
    nll = torch.where(valid, nll, 0.0)
    return nll.sum(1) / valid.sum(1)


# -- results --------------------------------------------------------------------------------
@dataclass
class ExperimentResult:
    """One trial: the fault, the clean and injected outputs compared, and what the checks saw.

    ``detected_by`` maps each of the config's checks to 0/1 (a sample flagged by any node of
    that check); ``pass_s`` is the forward pass's wall time, shared by ``trials_in_pass``
    trials."""

    config: ExperimentConfig = field(repr=False)
    trial_id: str
    kind: str  # "clean" or "injected"
    batch_index: int
    sample_index: int
    run_index: int | None  # None for a clean trial
    detected_by: dict[str, int]
    outcome: str
    clean_loss: float | None = None
    injected_loss: float | None = None
    output_rel_diff: float | None = None
    layer: int | None = None
    location: str | None = None
    bits: tuple[int, ...] | None = None  # None: a random bit per hit (probabilistic)
    index: tuple[int, ...] | None = None  # (b, h, i, j) or (b, h, i, d); None: probabilistic
    value_before: float | None = None
    value_after: float | None = None
    flips: int | None = None  # probabilistic faults: elements hit
    epsilon: float | None = None  # baseline bounds at the faulted row (scores/weights faults)
    lower: float | None = None
    upper: float | None = None
    margin: float | None = None
    pass_s: float = 0.0
    trials_in_pass: int = 1
    dataset: str | None = None  # None: the config's dataset_name

    @property
    def detected(self) -> int:
        return int(any(self.detected_by.values()))

    @property
    def loss_delta(self) -> float | None:
        if self.clean_loss is None or self.injected_loss is None:
            return None
        return self.injected_loss - self.clean_loss

    @property
    def ordinal(self) -> int:
        """Position of the trial in its config: sample-major, then run (clean: the sample)."""
        sample = self.batch_index * self.config.batch_size + self.sample_index
        return sample if self.run_index is None else sample * self.config.num_runs + self.run_index

    def to_record(self) -> TrialRecord:
        cfg = self.config
        extra: dict[str, Any] = {"batch": self.batch_index, "sample": self.sample_index,
                                 "run": self.run_index, "trials_in_pass": self.trials_in_pass,
                                 "pass_s": self.pass_s}
        if self.flips is not None:
            extra["flips"] = self.flips
        injected = self.kind == "injected"
        return TrialRecord(
            trial_id=self.trial_id, config_id=cfg.config_id, exp_name=cfg.exp_name,
            model=model_label(cfg), dataset=self.dataset or cfg.dataset_name, dtype=cfg.dtype,
            seed=cfg.seed, run_index=self.ordinal, kind=self.kind, reference=cfg.reference,
            fault_model=cfg.fault_model if injected else None, layer=self.layer,
            location=self.location, bit=min(self.bits) if self.bits else None,
            bits=json.dumps(list(self.bits)) if self.bits else None,
            index=json.dumps(list(self.index)) if self.index is not None else None,
            value_before=self.value_before, value_after=self.value_after,
            clean_loss=self.clean_loss, injected_loss=self.injected_loss,
            loss_delta=self.loss_delta, output_rel_diff=self.output_rel_diff,
            outcome=self.outcome, detected=self.detected,
            detected_by=json.dumps(self.detected_by), epsilon=self.epsilon, lower=self.lower,
            upper=self.upper, margin=self.margin,
            elapsed_s=self.pass_s / self.trials_in_pass, extra=json.dumps(extra))

    def to_dict(self) -> dict[str, Any]:
        return self.to_record().to_row()


def model_label(config: ExperimentConfig) -> str:
    """The model column of a trial: the registry id, marked when it is the random tiny variant."""
    try:
        name = models.resolve(config.model_name).hf_id
    except UserError:
        name = config.model_name  # a user model passed to run_all under its own name
    return f"{name} (tiny)" if config.tiny else name


# -- the instrumented model -----------------------------------------------------------------
def _fault_kind(config: ExperimentConfig) -> str:
    """The injection nodes a config needs: multi-bit flips are bit flips with a wider mask."""
    return "probabilistic" if config.fault_model == "probabilistic" else "bitflip"


def _task(model: Any) -> str:
    """causal-lm, masked-lm or encoder: from the registry, else from the HF class name."""
    if isinstance(model, models.LoadedModel):
        return model.spec.task
    # HF's fx tracer keeps the traced model's class here; a GraphModule's own name says nothing.
    name = getattr(model, "class_for_deserialization", type(model)).__name__
    if "CausalLM" in name or "LMHead" in name:
        return "causal-lm"
    return "masked-lm" if "MaskedLM" in name else "encoder"


class _Capture(fx.Interpreter):
    """Runs a GraphModule node by node and keeps the values of the named nodes."""

    def __init__(self, gm: fx.GraphModule, names: set[str]) -> None:
        super().__init__(gm)
        self.names = names
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if n.name in self.names:
            self.values[n.name] = value
        return value


class ModelHarness:
    """An instrumented model and what the runner needs to drive it; built once per model (and
    fault kind) for a whole sweep. The sequence length and batch may vary between calls."""

    def __init__(self, inst: Instrumented, task: str, device: str = "cpu") -> None:
        self.inst = inst
        self.task = task
        self.device = torch.device(device)
        self.inputs = tuple(n.target for n in inst.gm.graph.nodes if n.op == "placeholder")
        self.layers = sorted({s.layer for s in inst.sites})
        self.checks = sorted({c.check for c in inst.checks})
        if {"bounds", "bounds-qo"} <= set(self.checks):
            self.checks.append("comb")  # the detector reads it as either bounds path
        if self.device.type == "cuda" and "abft" in self.checks:
            use_float32_gemm_accumulation()
        self._compiled: nn.Module | None = None
        self._attention: dict[int, tuple[str, str]] | None = None

    def _feed(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: batch[name].to(self.device) for name in self.inputs}

    def forward(self, batch: Mapping[str, torch.Tensor], compiled: bool = False
                ) -> dict[str, torch.Tensor]:
        if compiled and self._compiled is None:
            self._compiled = self.inst.compile()
        module = self._compiled if compiled else self.inst.gm
        with torch.no_grad():
            return module(**self._feed(batch))

    def attention_nodes(self) -> dict[int, tuple[str, str]]:
        """Per layer, the gm nodes holding the logits that enter softmax and the weights that
        downstream ops consume, both after any injection node."""
        if self._attention is None:
            sites = {(s.layer, s.location): s for s in self.inst.sites}
            found: dict[int, tuple[str, str]] = {}
            # Match on the untouched trace: the instrumented graph keeps its node names.
            for att in match_attention(self.inst.original):
                logits = att.logits.name
                if att.logits is att.scores and (att.layer, "scores") in sites:
                    logits = sites[(att.layer, "scores")].inject_node
                weights = att.softmax.name
                if (att.layer, "weights") in sites:
                    weights = sites[(att.layer, "weights")].inject_node
                found[att.layer] = (logits, weights)
            self._attention = found
        return self._attention

    def capture(self, batch: Mapping[str, torch.Tensor]
                ) -> tuple[dict[str, torch.Tensor], dict[int, tuple[torch.Tensor, torch.Tensor]]]:
        """The outputs and, per layer, (logits, weights) of one eager pass."""
        nodes = self.attention_nodes()
        interp = _Capture(self.inst.gm, {name for pair in nodes.values() for name in pair})
        feed = self._feed(batch)
        with torch.no_grad():
            outputs = interp.run(*(feed[name] for name in self.inputs))
        return outputs, {layer: (interp.values[lg], interp.values[w])
                         for layer, (lg, w) in nodes.items()}


def _module(model: Any) -> nn.Module:
    return model.model if isinstance(model, models.LoadedModel) else model


def prepare(model: Any, configs: Sequence[ExperimentConfig]) -> ModelHarness:
    """Instrument ``model`` (a registry name, a LoadedModel or an HF module) once for every
    config in ``configs``: the union of their locations and checks, at every layer, with as
    many fault slots as the most trials any of them runs per pass."""
    first = configs[0]
    if isinstance(model, str):
        model = models.load_model(model, tiny=first.tiny, dtype=parse_dtype(first.dtype))
    kinds = {_fault_kind(c) for c in configs}
    if len(kinds) != 1:
        raise ValueError(f"one harness serves one fault kind, not {sorted(kinds)}")
    (kind,) = kinds
    module = _module(model).eval()
    dtype = parse_dtype(first.dtype)
    param = next(module.parameters(), None)
    if param is not None and param.dtype != dtype:
        raise UserError(f"the model is {str(param.dtype).removeprefix('torch.')} but the config "
                        f"asks for dtype {first.dtype}")
    module.to(first.device)
    runners = [ExperimentRunner(c) for c in configs]
    locations = [loc for loc in LOCATIONS if any(c.injection_location == loc for c in configs)]
    checks = sorted({c for r in runners for c in r.online_checks})
    # Probabilistic faults take one table entry per sample; bit flips one per trial in a pass.
    slots = max(c.batch_size if kind == "probabilistic" else c.trials_per_pass for c in configs)
    # The q@o bounds need K = V: like the seed's force_kv_equal, copy each layer's key projection
    # into its value projection, for every config of the group (the model is changed in place).
    kv_equal = any(c in ("bounds-qo", "comb") for c in checks)
    inst = instrument(module, locations=locations, checks=checks, fault_model=kind, slots=slots,
                      dtype=dtype, force_kv_equal=kv_equal)
    return ModelHarness(inst, _task(model), first.device)


# -- the runner -----------------------------------------------------------------------------
@dataclass
class _Reference:
    """What the clean pass of a batch leaves for its injected passes."""

    outputs: dict[str, torch.Tensor]
    losses: list[float] | None
    bounds: dict[int, BoundsResult]  # per layer, reference="baseline" only


class ExperimentRunner:
    """Runs one :class:`ExperimentConfig` (the seed's name and entry points)."""

    def __init__(self, config: ExperimentConfig) -> None:
        self.config = config
        checks = config.active_checks
        baseline = config.reference == "baseline" and "bounds" in checks
        self.host_checks = ["bounds"] if baseline else []
        self.online_checks = [c for c in checks if c not in self.host_checks]
        self._harness: tuple[Any, ModelHarness] | None = None

    # -- setup ------------------------------------------------------------------------------
    def harness(self, model: Any) -> ModelHarness:
        """``model`` ready to run this config: a ModelHarness or an Instrumented as it is,
        anything else (registry name, LoadedModel, HF module) instrumented once and cached."""
        if isinstance(model, ModelHarness):
            return model
        if self._harness is None or self._harness[0] is not model:
            if isinstance(model, Instrumented):
                harness = ModelHarness(model, _task(model.original), self.config.device)
            else:
                harness = prepare(model, [self.config])
            self._harness = (model, harness)
        return self._harness[1]

    def layers(self, harness: ModelHarness) -> list[int]:
        return harness.layers if self.config.injection_layers is None else \
            list(self.config.injection_layers)

    def validate(self, harness: ModelHarness, seq_len: int) -> None:
        """Raise UserError if this config cannot run on ``harness`` at ``seq_len`` tokens."""
        cfg = self.config
        missing = [c for c in self.online_checks if c not in harness.checks]
        if missing:
            raise UserError(f"the instrumented model has no {missing[0]!r} check; instrument it "
                            f"with checks={self.online_checks}")
        if not cfg.injection_enabled:
            return
        for layer in self.layers(harness):
            harness.inst.faults.site(layer, cfg.injection_location)
        if cfg.injection_idx is not None and cfg.fault_model != "probabilistic":
            for layer in self.layers(harness):
                harness.inst.faults.validate(self._fixed_fault(layer, 0), 1, seq_len)

    # -- entry points -----------------------------------------------------------------------
    def run_all(self, model: Any, dataloader: Iterable[Mapping[str, torch.Tensor]]
                ) -> list[ExperimentResult]:
        """Every trial of every batch, clean and injected."""
        return [r for results in self.iter_passes(model, dataloader) for r in results]

    def run_single(self, model: Any, batch: Mapping[str, torch.Tensor], batch_index: int = 0
                   ) -> list[ExperimentResult]:
        """The trials of one batch: its clean trials, then ``num_runs`` faults per sample."""
        passes = self._passes(self.harness(model), [(batch_index, batch)], frozenset(), None)
        return [r for results in passes for r in results]

    def iter_passes(self, model: Any, dataloader: Iterable[Mapping[str, torch.Tensor]], *,
                    skip: set[str] | frozenset[str] = frozenset(),
                    select: Callable[[int], bool] | None = None
                    ) -> Iterator[list[ExperimentResult]]:
        """The results of each forward pass as soon as it ran, leaving out trials whose id is in
        ``skip`` (a pass whose trials are all skipped does not run) and batches that ``select``
        rejects."""
        chosen = ((b, batch) for b, batch in enumerate(dataloader) if select is None or select(b))
        return self._passes(self.harness(model), chosen, skip,
                            getattr(dataloader, "dataset_label", None))

    def _passes(self, harness: ModelHarness,
                batches: Iterable[tuple[int, Mapping[str, torch.Tensor]]],
                skip: set[str] | frozenset[str], dataset: str | None
                ) -> Iterator[list[ExperimentResult]]:
        validated = False
        for b, batch in batches:
            size = batch["input_ids"].shape[0]
            if skip and all(t in skip for t in planned_ids(self.config, b, size)):
                continue
            if not validated:
                self.validate(harness, batch["input_ids"].shape[1])
                validated = True
            try:
                yield from self._batch_passes(harness, b, batch, skip, dataset)
            finally:
                harness.inst.faults.clear()

    # -- one batch --------------------------------------------------------------------------
    def _batch_passes(self, h: ModelHarness, b: int, batch: Mapping[str, torch.Tensor],
                      skip: set[str] | frozenset[str], dataset: str | None
                      ) -> Iterator[list[ExperimentResult]]:
        cfg = self.config
        size = batch["input_ids"].shape[0]
        ref, clean = self._clean_pass(h, b, batch, dataset)
        clean = [r for r in clean if r.trial_id not in skip]
        if clean:
            yield clean
        if not cfg.injection_enabled:
            return
        for r in range(cfg.num_runs):
            for start in range(0, size, cfg.trials_per_pass):
                samples = [s for s in range(start, min(start + cfg.trials_per_pass, size))
                           if trial_id(cfg.config_id, b, s, r) not in skip]
                if samples:
                    yield self._injected_pass(h, b, r, samples, batch, ref, dataset)

    def _run(self, h: ModelHarness, batch: Mapping[str, torch.Tensor]
             ) -> tuple[dict[str, torch.Tensor], dict[int, tuple[torch.Tensor, torch.Tensor]],
                        dict[str, list[bool]], float]:
        """One forward pass with the armed faults: outputs, captured attention (baseline only),
        per-check flags per sample, and the pass's wall time."""
        h.inst.detector.reset(batch["input_ids"].shape[0])
        start = time.perf_counter()
        if self.host_checks:
            outputs, captured = h.capture(batch)
        else:
            outputs, captured = h.forward(batch, compiled=self.config.compile), {}
        if h.device.type == "cuda":  # kernels run asynchronously: time the pass, not its launch
            torch.cuda.synchronize(h.device)
        elapsed = time.perf_counter() - start
        return outputs, captured, h.inst.detector.flagged_samples(), elapsed

    def _losses(self, h: ModelHarness, outputs: Mapping[str, torch.Tensor],
                batch: Mapping[str, torch.Tensor]) -> list[float] | None:
        losses = sample_losses(h.task, outputs, batch["input_ids"].to(h.device),
                               batch["attention_mask"].to(h.device))
        return None if losses is None else losses.tolist()

    def _clean_pass(self, h: ModelHarness, b: int, batch: Mapping[str, torch.Tensor],
                    dataset: str | None) -> tuple[_Reference, list[ExperimentResult]]:
        cfg = self.config
        size = batch["input_ids"].shape[0]
        h.inst.faults.clear()
        outputs, captured, flags, elapsed = self._run(h, batch)
        losses = self._losses(h, outputs, batch)
        bounds = {layer: compute_attention_bounds(logits, weights)
                  for layer, (logits, weights) in captured.items()}
        host_flags = torch.zeros(size, dtype=torch.bool)
        for layer, (logits, weights) in captured.items():
            eps = compute_injected_epsilon_from_p(logits, weights)
            host_flags |= _per_sample(detect_violation(bounds[layer], eps)["s@w"], size).any(1)
        host = host_flags.tolist()
        results = [ExperimentResult(
            cfg, trial_id(cfg.config_id, b, s, None), "clean", b, s, None,
            detected_by=self._verdicts(flags, host, s), outcome="masked",
            clean_loss=None if losses is None else losses[s], pass_s=elapsed,
            trials_in_pass=size, dataset=dataset) for s in range(size)]
        return _Reference(outputs, losses, bounds), results

    def _verdicts(self, online: Mapping[str, list[bool]], host: list[bool], s: int
                  ) -> dict[str, int]:
        return {c: int(host[s] if c in self.host_checks else online[c][s])
                for c in self.config.active_checks}

    # -- faults -----------------------------------------------------------------------------
    def _fixed_fault(self, layer: int, sample: int) -> Fault:
        # Every sample is a trial: the config's (h, i, j) lands in each sample in turn, so its
        # batch index is replaced by the sample's.
        idx = self.config.injection_idx
        assert idx is not None
        return Fault(layer, self.config.injection_location, (sample, *idx[1:]), self._bits())

    def _bits(self) -> tuple[int, ...]:
        cfg = self.config
        return tuple(cfg.bits) if cfg.fault_model == "multibit" else (cfg.injection_bit,)

    def _trial_generator(self, b: int, s: int, r: int) -> torch.Generator:
        # Seeded by (seed, batch, sample, run) alone: a trial draws the same fault whatever pass
        # it shares, and configs that differ only in the bit hit the same elements.
        return torch.Generator().manual_seed(_derived_seed(self.config.seed, b, s, r))

    def _bitflip_fault(self, h: ModelHarness, b: int, s: int, r: int, seq_len: int) -> Fault:
        layers = self.layers(h)
        gen = self._trial_generator(b, s, r)
        layer = layers[int(torch.randint(len(layers), (1,), generator=gen))]
        if self.config.injection_idx is not None:
            return self._fixed_fault(layer, s)
        return h.inst.faults.random_fault(layer, self.config.injection_location, self._bits(), s,
                                          seq_len, gen)

    def _arm(self, h: ModelHarness, b: int, r: int, samples: list[int], size: int, seq_len: int
             ) -> dict[int, Fault]:
        """Write the pass's faults into the fault table; the fault of each sample."""
        cfg = self.config
        if cfg.fault_model != "probabilistic":
            armed = {s: self._bitflip_fault(h, b, s, r, seq_len) for s in samples}
            h.inst.faults.set_faults(armed.values(), size, seq_len)
            return armed
        # set_random hits one site per pass: the layer is drawn per (batch, run), which every
        # trial of the pass shares; samples outside the pass get rate 0.
        layers = self.layers(h)
        gen = self._trial_generator(b, -1, r)
        layer = layers[int(torch.randint(len(layers), (1,), generator=gen))]
        chosen = set(samples)
        rates = [cfg.ber if s in chosen else 0.0 for s in range(size)]
        seeds = [_derived_seed(cfg.seed, b, s, r) % _PROB_SEED_MOD for s in range(size)]
        h.inst.faults.set_random(layer, cfg.injection_location, rates, seeds, cfg.bits)
        bits = tuple(cfg.bits) if cfg.bits else ()
        return {s: Fault(layer, cfg.injection_location, (s,), bits) for s in samples}

    def _injected_pass(self, h: ModelHarness, b: int, r: int, samples: list[int],
                       batch: Mapping[str, torch.Tensor], ref: _Reference, dataset: str | None
                       ) -> list[ExperimentResult]:
        cfg = self.config
        size, seq_len = batch["input_ids"].shape
        armed = self._arm(h, b, r, samples, size, seq_len)
        outputs, captured, flags, elapsed = self._run(h, batch)
        applied = h.inst.faults.applied()
        rel_t, due_t = output_difference(ref.outputs, outputs)
        rel, due = rel_t.tolist(), due_t.tolist()
        losses = self._losses(h, outputs, batch)
        host, rows = self._baseline(captured, ref, armed, size)
        probabilistic = cfg.fault_model == "probabilistic"
        results = []
        for k, s in enumerate(samples):
            fault = armed[s]
            info = applied[s] if probabilistic else applied[k]
            row = rows.get(s, {})
            results.append(ExperimentResult(
                cfg, trial_id(cfg.config_id, b, s, r), "injected", b, s, r,
                detected_by=self._verdicts(flags, host, s), outcome=classify(rel[s], due[s]),
                clean_loss=None if ref.losses is None else ref.losses[s],
                injected_loss=None if losses is None else losses[s], output_rel_diff=rel[s],
                layer=fault.layer, location=fault.location, bits=fault.bits or None,
                index=None if probabilistic else fault.index,
                value_before=info.get("before"), value_after=info.get("after"),
                flips=info.get("flips"), pass_s=elapsed, trials_in_pass=len(samples),
                dataset=dataset, **row))
        return results

    def _baseline(self, captured: Mapping[int, tuple[torch.Tensor, torch.Tensor]],
                  ref: _Reference, armed: Mapping[int, Fault], size: int
                  ) -> tuple[list[bool], dict[int, dict[str, float]]]:
        """reference="baseline": per sample, whether the injected epsilon leaves the clean
        bounds anywhere at its faulted layer; and, for a scores/weights fault, epsilon, bounds
        and margin of the faulted row."""
        flagged = [False] * size
        rows: dict[int, dict[str, float]] = {}
        if not self.host_checks:
            return flagged, rows
        for layer in sorted({f.layer for f in armed.values()}):
            logits, weights = captured[layer]
            bounds = ref.bounds[layer]
            eps = compute_injected_epsilon_from_p(logits, weights)
            verdict = detect_violation(bounds, eps)
            any_row = _per_sample(verdict["s@w"], size).any(1).tolist()
            fields = {"epsilon": eps, "lower": bounds.lower, "upper": bounds.upper,
                      "margin": verdict["margin_s@w"]}
            per_row = {k: _per_sample(v, size) for k, v in fields.items()}
            for s, fault in armed.items():
                if fault.layer != layer:
                    continue
                flagged[s] = any_row[s]
                if fault.location in ("scores", "weights") and len(fault.index) == 4:
                    _, head, i, _ = fault.index
                    row = head * logits.shape[-2] + i
                    rows[s] = {k: float(v[s, row]) for k, v in per_row.items()}
        return flagged, rows


def _per_sample(x: torch.Tensor, size: int) -> torch.Tensor:
    """Per-row values (B, H, T) or fused (B*H, T) as (B, H*T): the batch leads both layouts."""
    return x.reshape(size, -1)


# -- data and models ------------------------------------------------------------------------
# The dataset column of trials whose text is fxsdc.data's offline fallback, not the config's.
FALLBACK_DATASET = "python-stdlib-docstrings"


class Batches(list):
    """Token batches; ``dataset_label`` names their text when it is not the config's dataset."""

    def __init__(self, batches: Iterable[dict[str, torch.Tensor]], source: str,
                 dataset_label: str | None = None) -> None:
        super().__init__(batches)
        self.source = source
        self.dataset_label = dataset_label


def load_model(config: ExperimentConfig) -> models.LoadedModel:
    """The default ``model_fn``: the registry model of ``config`` (tiny when asked)."""
    return models.load_model(config.model_name, tiny=config.tiny,
                             dtype=parse_dtype(config.dtype))


def load_batches(config: ExperimentConfig, model: Any) -> Batches:
    """The default ``data_fn``: ``num_samples`` windows of real text (``fxsdc.data``), tokenised
    by the model's own tokenizer or, without one, bytes folded into its vocabulary."""
    tokenizer = getattr(model, "tokenizer", None) or data.ByteTokenizer()
    vocab = _module(model).config.vocab_size
    needed = config.num_samples * config.seq_length
    # Read texts in growing slices until they hold enough tokens: the fallback corpus takes
    # seconds to read whole. The batches are the token stream's prefix whatever the slice.
    cap = 64
    while True:
        texts, source = data.load_texts(config.dataset_name, config.dataset_config,
                                        config.dataset_split, max_texts=cap)
        tokens = sum(len(tokenizer.encode(t, add_special_tokens=False, verbose=False)) + 1
                     for t in texts)
        if tokens >= needed or len(texts) < cap:
            break
        cap *= 4
    batches = data.make_batches(texts, tokenizer, config.batch_size, config.seq_length,
                                config.num_samples, vocab_size=vocab)
    # data.load_texts says "fallback: ..." when the dataset could not be loaded.
    return Batches(batches, source, FALLBACK_DATASET if source.startswith("fallback") else None)


# -- sweeps ---------------------------------------------------------------------------------
@dataclass
class SweepProgress:
    """Where a sweep stands; passed to the progress callback after every pass."""

    total: int  # trials of this shard
    skipped: int  # already in the store when the sweep started
    ran: int = 0  # trials run by this call
    detected: int = 0  # injected trials detected by any check, this call
    clean_flagged: int = 0  # clean trials flagged (false positives), this call
    started: float = field(default_factory=time.perf_counter)

    @property
    def done(self) -> int:
        return self.skipped + self.ran

    @property
    def rate(self) -> float:
        """Trials per second run by this call."""
        elapsed = time.perf_counter() - self.started
        return self.ran / elapsed if elapsed > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        rate = self.rate
        return (self.total - self.done) / rate if rate > 0 else None


def _model_key(config: ExperimentConfig) -> tuple[Any, ...]:
    return (config.model_name, config.tiny, config.dtype, config.device)


def _data_key(config: ExperimentConfig) -> tuple[Any, ...]:
    return (_model_key(config), config.dataset_name, config.dataset_config,
            config.dataset_split, config.batch_size, config.seq_length, config.num_samples)


def sweep_configs(sweep: ParameterSweepConfig | Sequence[ExperimentConfig]
                  ) -> list[ExperimentConfig]:
    configs = sweep.generate_configs() if isinstance(sweep, ParameterSweepConfig) else list(sweep)
    ids = [c.config_id for c in configs]
    if len(set(ids)) != len(ids):
        raise UserError("the sweep repeats a config")
    return configs


def shard_batches(config: ExperimentConfig, shard: tuple[int, int] | None) -> list[int]:
    """The batches of ``config`` that ``shard`` (index, count) runs."""
    return [b for b in range(num_batches(config))
            if shard is None or shard_of(pass_key(config.config_id, b), shard[1]) == shard[0]]


def run_parameter_sweep(sweep: ParameterSweepConfig | Sequence[ExperimentConfig],
                        model_fn: Callable[[ExperimentConfig], Any] | None = None,
                        data_fn: Callable[[ExperimentConfig, Any], Iterable[Any]] | None = None,
                        logger: ResultsLogger | None = None,
                        shard: tuple[int, int] | None = None,
                        progress: Callable[[SweepProgress], None] | None = None,
                        keep: bool | None = None) -> list[ExperimentResult]:
    """Run every config of ``sweep`` (the seed's entry point).

    ``model_fn(config)`` gives the model (default :func:`load_model`; called once per model),
    ``data_fn(config, model)`` its batches (default :func:`load_batches`). With a ``logger``
    each config is saved, trials it already holds are skipped, and each pass's trials are stored
    in one transaction right after the pass. ``shard=(i, n)`` runs only the batches whose
    (config, batch) key hashes to i. Returns the results run by this call when ``keep`` (default:
    when there is no logger, since a large sweep would not fit in memory).
    """
    model_fn = model_fn or load_model
    data_fn = data_fn or load_batches
    keep = logger is None if keep is None else keep
    configs = sweep_configs(sweep)
    runners = {c.config_id: ExperimentRunner(c) for c in configs}  # validates before any pass
    plans = {c.config_id: shard_batches(c, shard) for c in configs}
    done = logger.done_ids() if logger is not None else set()
    planned = {c.config_id: [t for b in plans[c.config_id]
                             for t in planned_ids(c, b, batch_samples(c, b))] for c in configs}
    state = SweepProgress(total=sum(len(v) for v in planned.values()),
                          skipped=sum(t in done for v in planned.values() for t in v))
    if logger is not None:
        for c in configs:
            if plans[c.config_id]:
                logger.save_config(c)
    if progress:
        progress(state)
    todo = [c for c in configs if any(t not in done for t in planned[c.config_id])]
    kept: list[ExperimentResult] = []
    groups: dict[tuple[Any, ...], list[ExperimentConfig]] = {}
    for c in todo:
        groups.setdefault(_model_key(c), []).append(c)
    for group in groups.values():
        model = model_fn(group[0])
        harnesses: dict[str, ModelHarness] = {}
        for kind in dict.fromkeys(_fault_kind(c) for c in group):
            harnesses[kind] = prepare(model, [c for c in group if _fault_kind(c) == kind])
        for c in group:  # every config of the model checked before its first pass
            runners[c.config_id].validate(harnesses[_fault_kind(c)], c.seq_length)
        datasets: dict[tuple[Any, ...], Iterable[Any]] = {}
        for c in group:
            key = _data_key(c)
            if key not in datasets:
                datasets[key] = data_fn(c, model)
            selected = set(plans[c.config_id])
            for results in runners[c.config_id].iter_passes(
                    harnesses[_fault_kind(c)], datasets[key], skip=done,
                    select=selected.__contains__):
                if logger is not None and results:
                    logger.log_many(r.to_record() for r in results)
                if keep:
                    kept.extend(results)
                state.ran += len(results)
                state.detected += sum(r.detected for r in results if r.kind == "injected")
                state.clean_flagged += sum(r.detected for r in results if r.kind == "clean")
                if progress:
                    progress(state)
    return kept
