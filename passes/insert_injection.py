"""Injection insertion: put one fault-injection node after each chosen attention tensor.

For every chosen (layer, location) the pass inserts ``fxsdc.runtime.inject_bitflips`` (or
``inject_random`` for probabilistic faults) right after the site's node and redirects the node's
value users to it. The inserted node reads the fault table from buffers registered on the
GraphModule, so which site, element and bits are hit (or none) is data, not graph structure: a
compiled module serves every trial of a sweep without recompiling.
"""
from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import fx, nn

from fxsdc import runtime

from .graph_utils import clone_graph_module, insert_buffer_reads
from .match_attention import LOCATIONS, AttentionSite, is_tensor, match_attention, tensor_users
from .ops import is_op

FAULT_MODELS = ("bitflip", "probabilistic")

BITFLIP_BUFFERS = ("word", "mask", "before", "after")
RANDOM_BUFFERS = ("site", "batch", "rate", "seed", "mask", "count")
BUFFER_PREFIX = "fxsdc_fault_"


@dataclass(frozen=True)
class SiteInfo:
    """One instrumented tensor: where it is and what it looks like for one sample."""

    site_id: int
    layer: int
    location: str
    node: str  # the fx node whose output is injected
    inject_node: str  # the inserted node
    sample_shape: tuple[int, ...]  # per-sample logical shape, e.g. (H, T, T) for scores
    dtype: str
    seq_dims: tuple[int, ...]  # dims of sample_shape that are the sequence length

    def shape_for(self, seq_len: int) -> tuple[int, ...]:
        return tuple(seq_len if i in self.seq_dims else d for i, d in enumerate(self.sample_shape))

    def to_dict(self) -> dict:
        return asdict(self)


def fault_buffers(slots: int, fault_model: str, sites: int, device: torch.device | str = "cpu"
                  ) -> dict[str, torch.Tensor]:
    """A fault table of ``slots`` entries for ``sites`` sites with every fault off (layout:
    :mod:`fxsdc.runtime`)."""
    def full(value: float, dtype: torch.dtype) -> torch.Tensor:
        return torch.full((slots,), value, dtype=dtype, device=device)

    if fault_model == "bitflip":
        return {"word": torch.full((sites, slots), -1, dtype=torch.int64, device=device),
                "mask": full(0, torch.int64), "before": full(float("nan"), torch.float64),
                "after": full(float("nan"), torch.float64)}
    return {"site": full(-1, torch.int64), "batch": full(0, torch.int64),
            "rate": full(0.0, torch.float64), "seed": full(0, torch.int64),
            "mask": full(0, torch.int64), "count": full(0, torch.int64)}


def _fused_heads(shape: Sequence[int], batch: int) -> int:
    """H for a fused (B*H, T, X) layout, as OPT's bmm uses; 0 for a (B, ...) layout."""
    return 0 if shape[0] == batch else shape[0] // batch


def is_gemm_output(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` is a GEMM's output or a view of one (views, transposes, a split's
    pieces) with no other op reading it on the way. Under torch.compile the GEMM's output is a
    buffer that exists anyway, which an injection node at ``node`` (whose users it takes over)
    can flip in place without another reader seeing the flip."""
    while not (is_op(node, "matmul") or is_op(node, "linear", modules)):
        if is_op(node, "view") or is_op(node, "permute"):
            parent = node.args[0]
        elif (node.op == "call_function" and node.target is operator.getitem
              and isinstance(node.args[0], fx.Node) and is_op(node.args[0], "view")
              and _distinct_pieces(node.args[0])):
            parent = node.args[0].args[0]  # past the split, whose other pieces are disjoint
        else:
            return False
        if len(tensor_users(parent)) != 1:
            return False
        node = parent
    return True


def _distinct_pieces(split: fx.Node) -> bool:
    """Whether each value user of a split or chunk takes a piece of its own."""
    users = tensor_users(split)
    pieces = [u.args[1] for u in users if u.op == "call_function" and u.target is operator.getitem]
    return len(pieces) == len(users) == len(set(pieces))


def feeds_gemms_only(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether every value user of ``node`` is a GEMM, or reaches one through ops that pass the
    values on unchanged (dropout in eval mode, casts to the same dtype): then torch.compile stores
    ``node``'s tensor as the GEMM's operand anyway, e.g. the attention weights."""
    users = tensor_users(node)
    dtype = node.meta["tensor_meta"].dtype
    return bool(users) and all(
        is_op(user, "matmul") or (
            (is_op(user, "dropout", modules) or is_op(user, "cast"))
            and is_tensor(user) and user.meta["tensor_meta"].dtype == dtype
            and feeds_gemms_only(user, modules))
        for user in users)


def injection_kwargs(site: AttentionSite, location: str, modules: dict[str, nn.Module]
                     ) -> dict[str, object]:
    """How an injection node flips its site (:func:`fxsdc.runtime.inject_bitflips`), as its
    keyword arguments: in place where the site's tensor is one the model stores anyway and no
    other op reads (a GEMM's output, or weights that only feed a GEMM); for the scaled scores, by
    a select of values flipped from the product q·kᵀ and the one constant scaling the model
    applies to it (replayed on the read elements); else (nothing) by a select of the flipped
    elements."""
    node = site.node(location)
    # The weights are softmax's own output; other sites may be views, whose bases others read.
    if is_gemm_output(node, modules) or (location == "weights" and feeds_gemms_only(node, modules)):
        return {"in_place": True}
    if location == "scores" and site.scale is not None:  # site.qk is a matmul: a GEMM output
        (op,) = site.scale_ops
        operand, divides = site.scale
        if not op.kwargs and (op.args[0] is site.qk or (not divides and site.qk in op.args)):
            return {"source": site.qk, "scale": operand, "divide": divides}
    return {}


def insert_fault_injection(gm: fx.GraphModule, *, locations: Sequence[str] = LOCATIONS,
                           layers: Sequence[int] | None = None, fault_model: str = "bitflip",
                           slots: int = 1) -> fx.GraphModule:
    """Return a copy of ``gm`` with an injection node at each chosen (layer, location).

    ``gm`` must carry shape metadata from an example whose batch size and sequence length are
    given by its ``input_ids`` placeholder. The returned module has the fault-table buffers
    (``fxsdc_fault_*``, every fault off) and ``meta["fxsdc_sites"]``: a list of :class:`SiteInfo`.
    """
    if fault_model not in FAULT_MODELS:
        raise ValueError(f"unknown fault model {fault_model!r}; choose from {FAULT_MODELS}")
    gm = clone_graph_module(gm)
    attention = match_attention(gm)
    chosen_layers = range(len(attention)) if layers is None else layers
    example = next(n for n in gm.graph.nodes if n.op == "placeholder" and is_tensor(n))
    batch, seq_len = example.meta["tensor_meta"].shape[:2]

    names = RANDOM_BUFFERS if fault_model == "probabilistic" else BITFLIP_BUFFERS
    site_count = len(chosen_layers) * len(locations)
    for name, value in fault_buffers(slots, fault_model, site_count).items():
        gm.register_buffer(BUFFER_PREFIX + name, value)
    reads = insert_buffer_reads(gm, [BUFFER_PREFIX + n for n in names])
    inject = runtime.inject_random if fault_model == "probabilistic" else runtime.inject_bitflips
    modules = dict(gm.named_modules())

    sites: list[SiteInfo] = []
    for layer in chosen_layers:
        for location in locations:
            target = attention[layer].node(location)
            meta = target.meta["tensor_meta"]
            fused = _fused_heads(meta.shape, batch)
            sample_shape = ((fused,) if fused else ()) + tuple(meta.shape[1:])
            site_id = len(sites)
            users = tensor_users(target)
            with gm.graph.inserting_after(target):
                kwargs = (injection_kwargs(attention[layer], location, modules)
                          if inject is runtime.inject_bitflips else {})
                node = gm.graph.create_node("call_function", inject,
                                            (target, site_id, fused, *reads), kwargs,
                                            name=f"fxsdc_inject_{location}_{layer}")
            node.meta["tensor_meta"] = meta
            node.meta["fxsdc_site"] = (layer, location)
            for user in users:
                user.replace_input_with(target, node)
            sites.append(SiteInfo(site_id, layer, location, target.name, node.name, sample_shape,
                                  str(meta.dtype).removeprefix("torch."),
                                  tuple(i for i, d in enumerate(sample_shape) if d == seq_len)))
    gm.graph.lint()
    gm.recompile()
    gm.meta["fxsdc_sites"] = sites
    gm.meta["fxsdc_fault_model"] = fault_model
    return gm
