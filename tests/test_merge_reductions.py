"""The inductor pass that merges identical reductions: on a hand-built graph, inside a real
compile, where the softmax's row maximum and a check's become one, and in a checked GPT-2 layer's
generated code."""
from __future__ import annotations

import re

import pytest
import torch
import torch._inductor.config as inductor_config
from torch import fx
from torch._inductor.utils import run_and_get_code

import passes.merge_reductions as merge_reductions
from fxsdc import instrument
from fxsdc.pipeline import compile_module
from passes.merge_reductions import merge_duplicate_reductions

from .helpers import token_inputs

aten = torch.ops.aten


def _graph() -> tuple[fx.Graph, dict[str, fx.Node]]:
    g = fx.Graph()
    x = g.placeholder("x")
    y = g.placeholder("y")
    nodes = {
        "max": g.call_function(aten.amax.default, (x, [-1], True)),
        "max_again": g.call_function(aten.amax.default, (x, [-1], True)),
        "max_no_keepdim": g.call_function(aten.amax.default, (x, [-1], False)),
        "max_of_y": g.call_function(aten.amax.default, (y, [-1], True)),
        "min": g.call_function(aten.amin.default, (x, [-1], True)),
        "sum": g.call_function(aten.sum.dim_IntList, (x, [-1])),
        "sum_again": g.call_function(aten.sum.dim_IntList, (x, [-1])),
        "sum_dim0": g.call_function(aten.sum.dim_IntList, (x, [0])),
        "exp": g.call_function(aten.exp.default, (x,)),
        "exp_again": g.call_function(aten.exp.default, (x,)),
        "abs": g.call_function(aten.abs.default, (x,)),
        "abs_again": g.call_function(aten.abs.default, (x,)),
    }
    nodes["abs_sum"] = g.call_function(aten.sum.dim_IntList, (nodes["abs"], [-1]))
    nodes["abs_again_sum"] = g.call_function(aten.sum.dim_IntList, (nodes["abs_again"], [-1]))
    g.output(tuple(nodes.values()))
    return g, nodes


def test_merges_only_identical_reductions_and_keeps_values() -> None:
    g, _ = _graph()
    before = fx.GraphModule(torch.nn.Module(), g)
    x, y = torch.randn(3, 5), torch.randn(3, 5)
    expected = before(x, y)
    g2, nodes2 = _graph()
    assert merge_duplicate_reductions(g2) == 3
    g2.lint()
    kept = {n.name for n in g2.nodes}
    for name in ("max_again", "sum_again", "abs_again", "abs_again_sum"):
        assert nodes2[name].name not in kept
    # Different keepdim, input, op or dims stay apart; pointwise ops other than the reductions'
    # operands (abs) are inductor's to fuse.
    for name in ("max", "max_no_keepdim", "max_of_y", "min", "sum", "sum_dim0", "exp",
                 "exp_again", "abs", "abs_sum"):
        assert nodes2[name].name in kept
    after = fx.GraphModule(torch.nn.Module(), g2)(x, y)
    assert all(torch.equal(a, b) for a, b in zip(expected, after))


def test_compile_module_shares_the_softmax_maximum(monkeypatch) -> None:
    merged: list[int] = []
    original = merge_reductions.merge_duplicate_reductions
    monkeypatch.setattr(merge_reductions, "merge_duplicate_reductions",
                        lambda graph: merged.append(original(graph)))

    def softmax_and_row_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.softmax(x, -1), x.amax(-1, keepdim=True)

    x = torch.randn(4, 7, 33)
    with inductor_config.patch({"fx_graph_cache": False}), torch.no_grad():
        merged_out = compile_module(softmax_and_row_max)(x)
        assert merged == [1]
        torch._dynamo.reset()  # compile afresh, without the pass (inductor's exp rounds as above)
        plain_out = torch.compile(softmax_and_row_max)(x)
    assert merged == [1]
    assert all(torch.equal(a, b) for a, b in zip(merged_out, plain_out))


@pytest.mark.slow
def test_checked_gpt2_layer_takes_the_logits_maximum_once() -> None:
    """The bounds check's row maximum over the stored logits is the softmax's own maximum of
    them: with the pass, the compiled layer has one maximum reduction fewer (counted in the
    generated C++ as vectorised max accumulations), and the check's ties and second maximum no
    longer wait for a maximum of their own."""
    result = instrument("gpt2", tiny=True, checks=("bounds",), layers=[0])
    batch, seq = 2, 64
    inputs = token_inputs(result.original.config.vocab_size, batch, seq)
    result.detector.reset(batch)
    max_loops = {}
    for name, compile_fn in (("plain", torch.compile), ("merged", compile_module)):
        torch._dynamo.reset()
        with inductor_config.patch({"fx_graph_cache": False}), torch.no_grad():
            _, code = run_and_get_code(compile_fn(result.gm), **inputs)
        max_loops[name] = len(re.findall(r"tmp_acc\d+_vec = at::vec::maximum\(", "\n".join(code)))
    assert max_loops["plain"] > 0, "the probe must see the max reductions"
    assert max_loops["merged"] == max_loops["plain"] - 1, max_loops
