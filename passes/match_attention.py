"""Attention-site matching: find each layer's attention ops in a traced transformer graph.

Anchored on softmax: every softmax over attention logits is one attention site, and layers are
numbered in graph order. From there the pass walks the data flow through the op-equivalence table
(:mod:`passes.ops`), never through node names:

    q_proj ─ view ─ permute ─▶ q ┐                       (rotary, repeat_kv, q scaling: any ops)
    k_proj ─ view ─ permute ─▶ k ┴▶ matmul(q, kᵀ) ─ scale ─▶ scores ─ mask ops ─▶ softmax ─▶ weights
    v_proj ─ view ─ permute ─▶ v ──────────────────────────── matmul(weights, v) ─▶ out ─▶ out_proj

``q``, ``k`` and ``v`` are the *per-head projections*: the first permute after each projection on
the way to the attention product, i.e. the (B, H, T, D) tensor before any rotary embedding,
``repeat_kv`` or reshape into (B*H, T, D). ``scores`` is the scaled product before masking (the
product itself when q was scaled beforehand, as in DistilBERT and OPT).
"""
from __future__ import annotations

import operator
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from .ops import is_op

LOCATIONS = ("q", "k", "v", "scores", "weights", "out")

_SEARCH_LIMIT = 64  # nodes visited backwards from an operand before giving up


class AttentionNotFound(ValueError):
    """The graph has no attention the matcher recognises."""


@dataclass
class AttentionSite:
    """The nodes of one layer's attention (all in the same graph)."""

    layer: int
    q: fx.Node
    k: fx.Node
    v: fx.Node
    q_proj: fx.Node
    k_proj: fx.Node
    v_proj: fx.Node
    qk: fx.Node  # the product q·kᵀ
    scores: fx.Node  # scaled qkᵀ, before masking
    logits: fx.Node  # what enters softmax (scaled and masked)
    softmax: fx.Node
    pv: fx.Node  # the product weights·v: the "out" location
    out_proj: fx.Node | None
    scale_ops: list[fx.Node] = field(default_factory=list)
    mask_ops: list[fx.Node] = field(default_factory=list)
    dropout: fx.Node | None = None
    scale: tuple[object, bool] | None = None  # (constant operand, divides?) of the scores' scaling

    def node(self, location: str) -> fx.Node:
        return {"q": self.q, "k": self.k, "v": self.v, "scores": self.scores,
                "weights": self.softmax, "out": self.pv}[location]

    def consumed(self, location: str) -> fx.Node:
        """The value downstream ops consume at ``location``: the output of the node our passes
        inserted there (an injection node, or a store for the checks), else the site's own node."""
        node = self.node(location)
        users = tensor_users(node)
        if len(users) == 1 and is_op(users[0], "inserted"):
            return users[0]
        return node

    def projection(self, location: str) -> fx.Node:
        return {"q": self.q_proj, "k": self.k_proj, "v": self.v_proj}[location]


_METADATA_METHODS = frozenset({"size", "dim", "numel", "stride"})


def is_tensor(node: fx.Node) -> bool:
    """Whether ``node`` produced a tensor, or a tuple of tensors such as ``split``'s, in shape
    propagation (as opposed to a size, a dtype or a device)."""
    meta = node.meta.get("tensor_meta")
    if isinstance(meta, TensorMetadata):  # a NamedTuple: test it before plain tuples
        return True
    return isinstance(meta, (tuple, list)) and bool(meta) and all(
        isinstance(m, TensorMetadata) for m in meta)


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """Inputs of ``node`` that its values flow from. A node our passes inserted flows from its
    first argument only (an injection node's others are the fault table and the tensor its
    records are read from)."""
    inputs = node.args[:1] if is_op(node, "inserted") else node.all_input_nodes
    return [i for i in inputs if isinstance(i, fx.Node) and is_tensor(i)
            and i.op not in ("placeholder", "get_attr")]


def tensor_users(node: fx.Node) -> list[fx.Node]:
    """Users of ``node`` that consume its values, not only its metadata (size, dtype, device)."""
    return [u for u in node.users
            if not (u.op == "call_method" and u.target in _METADATA_METHODS)
            and not (u.op == "call_function" and getattr(u.target, "__name__", "") == "getattr")]


def _path_back_to(start: fx.Node, target_class: str, modules: dict[str, nn.Module]
                  ) -> list[fx.Node] | None:
    """Breadth-first search backwards from ``start`` for the nearest ``target_class`` node; the
    path from that node to ``start`` (both included), or None."""
    parent: dict[fx.Node, fx.Node | None] = {start: None}
    queue = deque([start])
    while queue and len(parent) < _SEARCH_LIMIT:
        node = queue.popleft()
        if is_op(node, target_class, modules):
            path = [node]
            while parent[path[-1]] is not None:
                path.append(parent[path[-1]])
            return path
        for inp in tensor_inputs(node):
            if inp not in parent:
                parent[inp] = node
                queue.append(inp)
    return None


def _forward_to(start: fx.Node, target_class: str, passthrough: tuple[str, ...],
                modules: dict[str, nn.Module]) -> tuple[fx.Node | None, list[fx.Node]]:
    """Follow the single value-consuming user of ``start`` through ``passthrough`` ops until a
    ``target_class`` node; returns it (or None) and the ops passed through."""
    passed: list[fx.Node] = []
    node = start
    for _ in range(_SEARCH_LIMIT):
        users = tensor_users(node)
        if len(users) != 1:
            return None, passed
        node = users[0]
        if is_op(node, target_class, modules):
            return node, passed
        if not any(is_op(node, c, modules) for c in passthrough):
            return None, passed
        passed.append(node)
    return None, passed


def _per_head(operand: fx.Node, modules: dict[str, nn.Module]) -> tuple[fx.Node, fx.Node]:
    """The projection feeding ``operand`` and the first permute after it on the way."""
    region: set[fx.Node] = set()
    projections: list[fx.Node] = []
    stack = [operand]
    while stack and len(region) < _SEARCH_LIMIT:
        node = stack.pop()
        if node in region:
            continue
        region.add(node)
        if is_op(node, "linear", modules):
            projections.append(node)
            continue
        stack.extend(tensor_inputs(node))
    if len(projections) != 1:
        raise AttentionNotFound(f"expected one projection feeding {operand.name}, "
                                f"found {len(projections)}")
    projection = projections[0]
    # Nodes of the region downstream of the projection, in graph order.
    downstream = {projection}
    for node in projection.graph.nodes:
        if node in region and any(i in downstream for i in node.all_input_nodes):
            downstream.add(node)
            if is_op(node, "permute", modules):
                return projection, node
    raise AttentionNotFound(f"no per-head permute between {projection.name} and {operand.name}")


def _is_constant_scale(node: fx.Node, value_input: fx.Node) -> bool:
    """Whether ``node`` multiplies or divides ``value_input`` by a constant (a Python number or
    a 0-d ``torch.full``), as attention's 1/sqrt(d) scaling does."""
    others = [a for a in node.args if a is not value_input]
    if len(others) != 1:
        return False
    other = others[0]
    return isinstance(other, (int, float)) or (
        isinstance(other, fx.Node) and other.target is torch.full and bool(other.args)
        and other.args[0] == [])


def match_attention(gm: fx.GraphModule) -> list[AttentionSite]:
    """All attention sites of ``gm``, one per layer in graph order.

    Needs shape metadata (:func:`passes.shapes.propagate_shapes`) to tell tensors from sizes.
    Raises :class:`AttentionNotFound` when the graph has no softmax fed by a matrix product.
    """
    if not any(is_tensor(n) for n in gm.graph.nodes):
        raise ValueError("match_attention needs shape metadata: run propagate_shapes first")
    modules = dict(gm.named_modules())
    sites: list[AttentionSite] = []
    for node in gm.graph.nodes:
        if not is_op(node, "softmax", modules):
            continue
        logits = node.args[0] if node.args else node.kwargs["input"]
        path = _path_back_to(logits, "matmul", modules)
        if path is None:
            continue  # a softmax that is not attention (e.g. a classifier head)
        qk = path[0]
        scores, scale_ops, mask_ops, scale = qk, [], [], None
        for prev, op in zip(path, path[1:]):
            if is_op(op, "mask", modules):
                mask_ops.append(op)
            elif not mask_ops and is_op(op, "scale", modules) and _is_constant_scale(op, prev):
                if scale_ops:
                    raise AttentionNotFound(f"two scalings of {qk.name}: {scale_ops[0].name}, "
                                            f"{op.name}")
                scale_ops.append(op)
                scores = op
                operand = next(a for a in op.args if a is not prev)
                scale = (operand, op.target in (operator.truediv, torch.div, "div", "__truediv__"))
        pv, passed = _forward_to(node, "matmul", ("cast", "dropout", "layout", "inserted"),
                                 modules)
        if pv is None or (pv.args[0] is not node and pv.args[0] not in passed):
            raise AttentionNotFound(f"softmax {node.name} does not feed a weights·v product")
        out_proj, _ = _forward_to(pv, "linear", ("permute", "layout", "inserted"), modules)
        q_proj, q = _per_head(qk.args[0], modules)
        k_proj, k = _per_head(qk.args[1], modules)
        v_proj, v = _per_head(pv.args[1], modules)
        dropout = next((p for p in passed if is_op(p, "dropout", modules)), None)
        sites.append(AttentionSite(len(sites), q, k, v, q_proj, k_proj, v_proj, qk, scores,
                                   logits, node, pv, out_proj, scale_ops, mask_ops, dropout,
                                   scale))
    if not sites:
        raise AttentionNotFound("no attention found: no softmax fed by a matrix product")
    return sites
