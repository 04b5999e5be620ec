"""The pipeline behind `fxsdc.instrument`: trace a model, run the passes, return the
instrumented GraphModule with its fault and detector controls."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from passes.insert_checks import (CHECKS, CheckInfo, KNotEqualV, head_columns, insert_checks,
                                  projection_params)
from passes.insert_injection import FAULT_MODELS, SiteInfo, insert_fault_injection
from passes.match_attention import LOCATIONS, AttentionNotFound, match_attention
from passes.merge_reductions import compile_options
from passes.shapes import propagate_shapes

from . import models
from .errors import UserError
from .detector import Detector
from .faults import FaultController, InjectionLocation
from .tracing import trace

# Odd example sizes, so that the sequence length cannot be mistaken for a head count or head
# dimension when the passes read per-site shapes (see SiteInfo.seq_dims).
EXAMPLE_BATCH, EXAMPLE_SEQ = 3, 13


@dataclass
class Instrumented:
    """An instrumented model: ``gm`` (the rewritten GraphModule), its injection ``sites`` and
    ``checks``, the traced ``original`` it came from (sharing weights), ``faults`` to arm and read
    faults and ``detector`` to read and reset the checks. Unpacks as
    ``gm, sites = fxsdc.instrument(...)``."""

    gm: fx.GraphModule
    sites: list[SiteInfo]
    original: fx.GraphModule
    example: dict[str, torch.Tensor]
    loaded: models.LoadedModel | None = None
    faults: FaultController = field(init=False)
    detector: Detector = field(init=False)

    def __post_init__(self) -> None:
        self.faults = FaultController(self.gm)
        self.detector = Detector(self.gm)

    @property
    def checks(self) -> list[CheckInfo]:
        return self.detector.checks

    def __iter__(self) -> Iterator[Any]:
        return iter((self.gm, self.sites))

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return self.gm(**inputs)

    def compile(self, **kwargs: Any) -> nn.Module:
        """``compile_module(self.gm, **kwargs)``. Faults are armed through ``self.faults`` as in
        eager mode; the compiled module shares the fault buffers."""
        return compile_module(self.gm, **kwargs)


def compile_module(module: nn.Module, **kwargs: Any) -> nn.Module:
    """``torch.compile(module, **kwargs)`` with fxsdc's inductor pass (``passes.merge_reductions``:
    a check's row maximum shares the softmax's) added to any ``options``; not with a ``mode``
    (torch.compile takes a mode or options, not both) or another backend. Compile the original
    model through this too when comparing: the pass then sees both graphs."""
    if kwargs.get("backend", "inductor") == "inductor" and kwargs.get("mode") is None:
        kwargs["options"] = {**compile_options(), **(kwargs.get("options") or {})}
    return torch.compile(module, **kwargs)


def _parse_layers(layers: Sequence[int] | None, num_layers: int) -> list[int] | None:
    if layers is None:
        return None
    bad = [layer for layer in layers if not 0 <= layer < num_layers]
    if bad:
        raise UserError(f"layer {bad[0]} is out of range: the model has {num_layers} layers "
                        f"(0-{num_layers - 1})")
    return sorted(set(layers))


def instrument(model: str | nn.Module, *, locations: Sequence[str] = LOCATIONS,
               layers: Sequence[int] | None = None, checks: Sequence[str] = (),
               fault_model: str = "bitflip",
               slots: int = 1, tiny: bool = False, pretrained: bool | None = None,
               force_kv_equal: bool = False,
               dtype: torch.dtype = torch.float32,
               example_inputs: dict[str, torch.Tensor] | None = None) -> Instrumented:
    """Trace ``model`` (a registry name or a loaded HF model), insert injection nodes at the
    chosen (layer, location) sites and the chosen ``checks`` (bounds, softmax, abft) at the
    chosen layers; every fault starts switched off. ``force_kv_equal`` copies each layer's key
    projection into its value projection first (in place, as the seed did), which the q@o bounds
    (checks ``bounds-qo``, ``comb``) need."""
    locations = [InjectionLocation.parse(loc).value for loc in locations]
    unknown = [c for c in checks if c not in CHECKS]
    if unknown:
        raise UserError(f"unknown check {unknown[0]!r}; choose from {', '.join(CHECKS)}")
    if fault_model not in FAULT_MODELS:
        raise UserError(f"unknown fault model {fault_model!r}; choose from "
                        f"{', '.join(FAULT_MODELS)}")
    if slots < 1:
        raise UserError("slots must be at least 1")
    loaded = None
    if isinstance(model, str):
        spec = models.resolve(model)
        _parse_layers(layers, spec.num_layers(tiny))  # fail before loading any weights
        loaded = models.load_model(model, tiny=tiny, pretrained=pretrained, dtype=dtype)
        model = loaded.model
    model.eval()
    device = next(model.parameters()).device
    if device.type != "cpu":
        # HF's fx tracer run on a GPU model gave a graph mixing devices (seen on an H200: a
        # torch.where of CUDA and CPU tensors in shape propagation); traced on the CPU it runs
        # anywhere. So instrument on the CPU and move everything back.
        model.cpu()
        try:
            result = instrument(model, locations=locations, layers=layers, checks=checks,
                                fault_model=fault_model, slots=slots, tiny=tiny,
                                pretrained=pretrained, force_kv_equal=force_kv_equal,
                                dtype=dtype, example_inputs=None if example_inputs is None else
                                {k: v.cpu() for k, v in example_inputs.items()})
        finally:
            model.to(device)
        result.gm.to(device)
        result.original.to(device)
        result.example = {k: v.to(device) for k, v in result.example.items()}
        return result
    if example_inputs is None:
        example_inputs = models.sample_inputs(model, EXAMPLE_BATCH, EXAMPLE_SEQ)
    original = propagate_shapes(trace(model), example_inputs)
    try:
        num_layers = len(match_attention(original))
    except AttentionNotFound as exc:
        raise UserError(f"{type(model).__name__}: {exc}") from None
    chosen = _parse_layers(layers, num_layers)
    if force_kv_equal:
        copy_keys_into_values(original, example_inputs)
    gm = insert_fault_injection(original, locations=locations, layers=chosen,
                                fault_model=fault_model, slots=slots)
    if checks:
        try:
            gm = insert_checks(gm, example_inputs, checks=checks, layers=chosen)
        except KNotEqualV as exc:
            raise UserError(str(exc)) from None
    return Instrumented(gm, gm.meta["fxsdc_sites"], original, example_inputs, loaded)


@torch.no_grad()
def copy_keys_into_values(gm: fx.GraphModule, example_inputs: dict[str, torch.Tensor]) -> None:
    """Make V = K in every layer: copy the key projection's columns feeding each head into the
    value projection's (fused QKV weights included). Modifies the model's parameters."""
    sites = match_attention(gm)
    pairs = [pair for s in sites for pair in ((s.k_proj, s.k), (s.v_proj, s.v))]
    columns = head_columns(gm, example_inputs, pairs)
    for i in range(0, len(pairs), 2):
        (k_cols, k_scale), (v_cols, v_scale) = columns[i], columns[i + 1]
        if k_cols.shape != v_cols.shape or k_scale != v_scale:
            raise UserError("force_kv_equal: keys and values have different shapes or scales")
        k_weight, k_bias, _ = projection_params(gm, pairs[i][0])
        v_weight, v_bias, _ = projection_params(gm, pairs[i + 1][0])
        v_weight[:, v_cols.flatten()] = k_weight[:, k_cols.flatten()]
        if k_bias is not None and v_bias is not None:
            v_bias[v_cols.flatten()] = k_bias[k_cols.flatten()]


def compare_outputs(a: dict[str, Any], b: dict[str, Any]) -> tuple[bool, float]:
    """Whether two model outputs are bitwise equal (NaNs included), and their largest absolute
    difference: inf or NaN when a non-finite value appears on one side only."""
    equal, worst = True, 0.0
    for key, x in a.items():
        y = b[key]
        if not isinstance(x, torch.Tensor):
            continue
        if x.shape != y.shape or x.dtype != y.dtype:
            return False, float("nan")
        equal &= torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8))
        if x.numel():
            diff = (x.double() - y.double()).abs()
            same_nan = x.isnan() & y.isnan()  # NaN on both sides is no difference
            diff = torch.where(same_nan | (x == y), 0.0, diff)
            worst = max(worst, float(diff.max()), key=lambda v: (v != v, v))  # NaN wins
    return equal, worst
