"""Tracing frontend: a Hugging Face model to a ``torch.fx.GraphModule`` with HF's fx tracer."""
from __future__ import annotations

# Import dynamo before HF's tracer ever runs: the tracer patches ``torch.finfo`` while tracing,
# and dynamo, if first imported then, records the patched function as a constant type, after which
# torch.compile of the traced module fails ("isinstance() arg 2 must be a type"). DESIGN section 6.
import torch._dynamo  # noqa: F401  (import for its side effect, see above)
import logging

import torch
from torch import fx
from transformers.utils import fx as hf_fx

from .errors import UserError

INPUT_NAMES = ("input_ids", "attention_mask")


def trace(model: torch.nn.Module, input_names: tuple[str, ...] = INPUT_NAMES) -> fx.GraphModule:
    """Trace ``model`` (eval mode, eager attention, no cache) into a GraphModule.

    The GraphModule's forward takes ``input_names`` as keyword arguments and returns the model's
    outputs as a dict, like the HF model called with ``return_dict=True``.
    """
    # torch warns on every trace that is_fx_tracing() also covers torch.export: not our concern.
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    try:
        gm = hf_fx.symbolic_trace(model, input_names=list(input_names))
    except (NotImplementedError, ValueError) as exc:
        raise UserError(f"Hugging Face's fx tracer cannot trace {type(model).__name__}: "
                        f"{str(exc).splitlines()[0]}") from None
    # No dead-code elimination here: the tracer records in-place ops such as OPT's causal
    # ``mask.masked_fill_(...)`` as nodes without users, and removing them changes the model.
    return gm
