"""Small graph helpers shared by the passes."""
from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import fx


def clone_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a deep copy of ``gm``'s graph (node meta included) that shares
    ``gm``'s parameters and buffers: passes edit the copy and leave their input untouched."""
    new = fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)
    new.meta.update(copy.copy(gm.meta))
    for name, buf in gm.named_buffers(recurse=False):
        if name not in new._buffers:
            new.register_buffer(name, buf)
    return new


def insert_buffer_reads(gm: fx.GraphModule, names: Sequence[str]) -> list[fx.Node]:
    """``get_attr`` nodes reading buffers ``names``, placed after the placeholders (reusing any
    that already exist)."""
    existing = {n.target: n for n in gm.graph.nodes if n.op == "get_attr"}
    anchor = next(n for n in reversed(gm.graph.nodes) if n.op == "placeholder")
    reads = []
    for name in names:
        if name not in existing:
            with gm.graph.inserting_after(anchor):
                existing[name] = gm.graph.get_attr(name)
            anchor = existing[name]
        reads.append(existing[name])
    return reads
