"""Op-equivalence table: which fx nodes compute the same operation.

The same math reaches an fx graph under several spellings (``torch.matmul``, ``Tensor.matmul`` as
a ``call_method``, ``operator.matmul``; ``F.softmax``, ``torch.softmax``, ``Tensor.softmax``).
Passes ask ``is_op(node, "matmul")`` instead of comparing targets or node names.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxsdc import runtime

# op class -> (call_function targets, call_method names, call_module types)
_TABLE: dict[str, tuple[frozenset, frozenset[str], tuple[type, ...]]] = {
    "matmul": (frozenset({torch.matmul, torch.bmm, operator.matmul}),
               frozenset({"matmul", "bmm", "__matmul__"}), ()),
    "softmax": (frozenset({F.softmax, torch.softmax, torch.nn.functional.softmax}),
                frozenset({"softmax"}), (nn.Softmax,)),
    "linear": (frozenset({F.linear, torch.addmm}), frozenset(), (nn.Linear,)),
    "dropout": (frozenset({F.dropout, torch.dropout}), frozenset({"dropout"}), (nn.Dropout,)),
    "cast": (frozenset(), frozenset({"to", "type", "float", "half", "bfloat16"}), ()),
    "permute": (frozenset({torch.transpose, torch.permute}),
                frozenset({"transpose", "permute"}), ()),
    # Ops whose output always aliases their input's storage (a split's pieces: its getitems).
    "view": (frozenset({torch.split, torch.chunk}), frozenset({"view", "split", "chunk"}), ()),
    "layout": (frozenset({torch.reshape, torch.flatten}),
               frozenset({"view", "reshape", "contiguous", "expand", "flatten"}), ()),
    "scale": (frozenset({operator.truediv, operator.mul, torch.div, torch.mul}),
              frozenset({"div", "mul", "__truediv__", "__mul__"}), ()),
    "mask": (frozenset({torch.where, torch.masked_fill, operator.add, torch.add, torch.max,
                        torch.maximum, torch.clamp}),
             frozenset({"masked_fill", "add", "__add__", "clamp", "max", "maximum"}), ()),
    # Nodes our own passes insert on a value's way (fault injection, stores and copies for the
    # checks): transparent to the matcher when it runs again; their values flow from the first
    # argument.
    "inserted": (frozenset({runtime.inject_bitflips, runtime.inject_random,
                            runtime.stored_when_compiling, runtime.recomputed_when_compiling}),
                 frozenset(), ()),
}


def is_op(node: fx.Node, op_class: str, modules: dict[str, nn.Module] | None = None) -> bool:
    """Whether ``node`` computes an op of ``op_class`` (a key of the table).

    ``modules`` (``dict(gm.named_modules())``) is needed to recognise ``call_module`` nodes.
    """
    functions, methods, module_types = _TABLE[op_class]
    if node.op == "call_function":
        return node.target in functions
    if node.op == "call_method":
        return node.target in methods
    if node.op == "call_module" and modules is not None and module_types:
        return isinstance(modules.get(str(node.target)), module_types)
    return False
