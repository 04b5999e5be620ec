"""Test helpers: inputs for a traced language model, intermediate values of a GraphModule run."""
from __future__ import annotations

import torch
from torch import fx


def node_values(gm: fx.GraphModule, inputs: dict[str, torch.Tensor], names: set[str]
                ) -> dict[str, torch.Tensor]:
    """Run ``gm`` on ``inputs`` and return the values of the nodes named in ``names`` (tensors
    cloned, other values such as dtypes as they are)."""
    captured: dict[str, torch.Tensor] = {}

    class Capture(fx.Interpreter):
        def run_node(self, n: fx.Node):
            result = super().run_node(n)
            if n.name in names:
                captured[n.name] = result.clone() if isinstance(result, torch.Tensor) else result
            return result

    placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    with torch.no_grad():
        Capture(gm).run(*(inputs[p] for p in placeholders))
    return captured


def token_inputs(vocab_size: int, batch: int, seq: int) -> dict[str, torch.Tensor]:
    """Seeded random ``input_ids`` (batch, seq) and an all-ones ``attention_mask``."""
    ids = torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long)}


def per_sample(t: torch.Tensor, sample_shape: tuple[int, ...]) -> torch.Tensor:
    """View a site's tensor as (batch, *sample_shape), un-fusing OPT's (B*H, T, X) layouts."""
    return t.reshape(-1, *sample_shape)
