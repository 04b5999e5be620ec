"""Shape propagation: record each node's output shape and dtype in ``node.meta``."""
from __future__ import annotations

import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp


def propagate_shapes(gm: fx.GraphModule, example_inputs: dict[str, torch.Tensor]
                     ) -> fx.GraphModule:
    """Run ``gm`` once on ``example_inputs`` (keyword inputs by placeholder name) and store
    ``node.meta["tensor_meta"]`` for every node; returns ``gm`` (the graph is unchanged)."""
    placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    missing = [p for p in placeholders if p not in example_inputs]
    if missing:
        raise ValueError(f"example inputs lack {missing}")
    with torch.no_grad():
        ShapeProp(gm).propagate(*(example_inputs[p] for p in placeholders))
    return gm
