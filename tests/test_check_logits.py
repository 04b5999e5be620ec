"""The copy of the logits (``passes.insert_checks.insert_check_logits``) that a checked layer's
softmax and checks read, stored (``store_logits``): the same values as the logits, mask operands
read from stores (bool masks as float32 copies), used only under torch.compile, and in a compiled
checked GPT-2 layer no loop over the logits expands a mask."""
from __future__ import annotations

import re

import pytest
import torch
import torch._inductor.config as inductor_config
from torch import fx
from torch._inductor.utils import run_and_get_code
from torch.fx.passes.shape_prop import _extract_tensor_metadata

import passes.insert_checks as insert_checks_module
from fxsdc import instrument, runtime
from fxsdc.pipeline import compare_outputs, compile_module

from .conftest import TINY_MODELS
from .helpers import node_values, token_inputs


def _copy_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.target is runtime.recomputed_when_compiling]


@pytest.mark.parametrize("model", ["gpt2", "distilbert-base-uncased"])
def test_the_copy_reads_float_masks_and_equals_the_logits(model: str) -> None:
    result = instrument(model, tiny=True, checks=("bounds",), layers=[0])
    (node,) = _copy_nodes(result.gm)
    logits, module, *inputs = node.args
    copy = getattr(result.gm, module.target)
    # Every boolean input of the masking ops goes through a float32 copy before it is used.
    placeholders = [n for n in copy.graph.nodes if n.op == "placeholder"]
    converted = {n.args[0] for n in copy.graph.nodes if n.target is runtime.stored_as_float}
    bool_inputs = {p for p, a in zip(placeholders, inputs)
                   if getattr(a.meta.get("tensor_meta"), "dtype", None) == torch.bool}
    assert bool_inputs and converted == bool_inputs
    assert all(user.target is runtime.stored_as_float for p in bool_inputs for user in p.users)
    result.detector.reset(result.example["input_ids"].shape[0])
    values = node_values(result.gm, result.example, {n.name for n in (node, logits, *inputs)})
    # Eagerly the node passes the logits tensor itself on; recomputed, the copy gives equal values.
    assert runtime.recomputed_when_compiling(values[logits.name], copy) is values[logits.name]
    assert torch.equal(values[node.name], values[logits.name])
    recomputed = copy(*(values[a.name] for a in inputs))
    assert torch.equal(recomputed, values[logits.name])


def test_bert_copy_reads_its_additive_mask_from_a_store() -> None:
    # BERT masks with an additive float mask made from the int64 attention mask: the copy reads
    # it from a store, and has no bool operand to convert.
    result = instrument("bert-base-uncased", tiny=True, checks=("bounds",), layers=[0])
    (node,) = _copy_nodes(result.gm)
    copy = getattr(result.gm, node.args[1].target)
    readers = [n.target for n in copy.graph.nodes if n.op == "call_function"
               and n.target in (runtime.stored_as_float, runtime.stored_operand)]
    assert readers == [runtime.stored_operand]


def _meta_node(graph: fx.Graph, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> fx.Node:
    node = graph.placeholder(name)
    node.meta["tensor_meta"] = _extract_tensor_metadata(torch.empty(shape, dtype=dtype))
    return node


def test_mask_operands_are_read_by_their_kind_and_size() -> None:
    """Bool masks through a float32 copy; floating operands smaller than the logits from a store;
    a single element, an integer tensor or one the logits' size as they are."""
    graph = fx.Graph()
    logits = _meta_node(graph, "logits", (2, 3, 8, 8), torch.float32)
    cases = {((1, 1, 8, 8), torch.bool): runtime.stored_as_float,
             ((2, 1, 1, 8), torch.float32): runtime.stored_operand,
             ((2, 1, 8, 8), torch.bfloat16): runtime.stored_operand,
             ((), torch.float32): None, ((1,), torch.float32): None,
             ((2, 1, 1, 8), torch.int64): None, ((2, 3, 8, 8), torch.float32): None}
    for i, ((shape, dtype), reader) in enumerate(cases.items()):
        operand = _meta_node(graph, f"operand_{i}", shape, dtype)
        assert insert_checks_module._stored_reader(operand, logits) is reader, (shape, dtype)


def _mask_loads_over_logits(module: torch.nn.Module, inputs: dict[str, torch.Tensor]
                            ) -> tuple[int, int]:
    """Loads of a bool mask vector (``VecMask<float,1>::from``, 16 scalars each) and of int64
    vectors (GPT-2's attention mask, converted in each element) indexed by x3, i.e. inside a
    four-deep loop over batch, heads, queries and keys: a pass over the logits. (The copies'
    conversions loop over the masks alone, two deep.)"""
    torch._dynamo.reset()
    with inductor_config.patch({"fx_graph_cache": False}), torch.no_grad():
        _, code = run_and_get_code(compile_module(module), **inputs)
    code = "\n".join(code)
    return (len(re.findall(r"VecMask<float,1>::from\([^;]*\bx3\b", code)),
            len(re.findall(r"VectorizedN<int64_t,2>::loadu\([^;]*\bx3\b", code)))


@pytest.mark.slow
def test_checked_layers_expand_no_mask_over_their_logits(monkeypatch) -> None:
    """GPT-2's softmax loads its bool causal mask and its int64 attention mask in its passes over
    the logits. In checked layers the softmax and the checks read the stored copy
    (``store_logits``), which reads the float copy of the one and the stored additive mask made
    from the other: no pass over the logits expands either. Without the copy, the stored logits
    are the model's own, and their masking pass expands both."""
    result = instrument("gpt2", tiny=True, checks=("bounds",))
    batch, seq = 2, 64
    inputs = token_inputs(result.original.config.vocab_size, batch, seq)
    bool_loads, int64_loads = _mask_loads_over_logits(result.original, inputs)
    assert bool_loads > 0 and int64_loads > 0, "the probe must see them"
    result.detector.reset(batch)
    assert _mask_loads_over_logits(result.gm, inputs) == (0, 0)
    monkeypatch.setattr(insert_checks_module, "insert_check_logits", lambda gm, site: None)
    without = instrument("gpt2", tiny=True, checks=("bounds",))
    without.detector.reset(batch)
    bool_loads, int64_loads = _mask_loads_over_logits(without.gm, inputs)
    assert bool_loads > 0 and int64_loads > 0


@pytest.mark.slow
def test_compiled_checks_read_the_copy_and_stay_silent_on_clean_padded_inputs() -> None:
    """DistilBERT masks padding with a bool ``masked_fill``: compiled, its bounds check reads the
    copy, checks as many rows as eagerly, flags none of them, and flags the row of a weight with
    a bit-30 flip."""
    from fxsdc.faults import Fault

    result = instrument("distilbert-base-uncased", tiny=True, checks=("bounds",), layers=[0])
    assert _copy_nodes(result.gm)
    inputs = dict(result.example)
    mask = torch.ones_like(inputs["attention_mask"])
    mask[0, 7:] = 0  # padding in the first sample
    inputs["attention_mask"] = mask
    batch, seq = inputs["input_ids"].shape
    torch._dynamo.reset()
    compiled = compile_module(result.gm)
    readings = {}
    for name, module in (("eager", result.gm), ("compiled", compiled)):
        result.detector.reset(batch)
        with torch.no_grad():
            module(**inputs)
        readings[name] = [(r.rows, r.flagged) for r in result.detector.read()]
    assert readings["compiled"] == readings["eager"]
    assert all(rows > 0 and flagged == 0 for rows, flagged in readings["compiled"])
    result.faults.set_faults([Fault(0, "weights", (1, 0, 3, 2), (30,))], batch, seq)
    result.detector.reset(batch)
    with torch.no_grad():
        compiled(**inputs)
    assert result.detector.read()[0].per_sample == (0, 1, 0)


@pytest.mark.parametrize("model", ["gpt2", "bert-base-uncased"])
def test_softmax_and_checks_of_checked_layers_read_stored_logits(model: str) -> None:
    """``store_logits``: in each checked layer the softmax reads a store node, of the copy that
    reads the mask operands from stores; the bounds and softmax checks read the same node.
    Unchecked layers, and layers checked by abft alone (no check reads their logits), keep the
    model's softmax input."""
    from passes.ops import is_op

    result = instrument(model, tiny=True, checks=("bounds", "softmax", "abft"), layers=[0])
    modules = dict(result.gm.named_modules())
    softmaxes = [n for n in result.gm.graph.nodes if is_op(n, "softmax", modules)]
    assert len(softmaxes) >= 2
    stored = softmaxes[0].args[0]
    assert stored.target is runtime.stored_when_compiling
    assert stored.args[0].target is runtime.recomputed_when_compiling
    readers = {n.name.split("_")[1] for n in stored.users if n is not softmaxes[0]}
    assert readers == {"bounds", "softmax"}
    assert all(s.args[0].target is not runtime.stored_when_compiling for s in softmaxes[1:])
    abft_only = instrument(model, tiny=True, checks=("abft",))
    assert not any(n.target is runtime.stored_when_compiling and n.name.startswith(
        "fxsdc_store_logits") for n in abft_only.gm.graph.nodes)
    # Eagerly the store passes the model's logits on: the outputs are the original's, bitwise.
    result.detector.reset(result.example["input_ids"].shape[0])
    with torch.no_grad():
        assert compare_outputs(result.original(**result.example),
                               result.gm(**result.example)) == (True, 0.0)


@pytest.mark.slow
@pytest.mark.parametrize("model", TINY_MODELS, ids=lambda n: n.split("/")[-1])
def test_compiled_detector_with_stored_logits_equals_the_compiled_original(model: str) -> None:
    """Every tiny architecture, all checks, no injection nodes: compiled, the softmax reading the
    stored copy of its logits, the forward equals the compiled original's bitwise and the checks
    flag no clean row of the rows they check. Inductor's pattern matcher is off for both: it
    replaces BERT's and DistilBERT's attention (matmul, scale, additive mask, softmax, matmul) in
    the original by a fused scaled-dot-product kernel, which rounds differently (~1 ulp of the
    logits here), and which a checked graph, whose checks read the scores and weights, cannot
    use."""
    result = instrument(model, tiny=True, locations=[], checks=("bounds", "softmax", "abft"))
    batch = result.example["input_ids"].shape[0]
    with torch.no_grad(), inductor_config.patch({"pattern_matcher": False}):
        torch._dynamo.reset()
        reference = compile_module(result.original)(**result.example)
        result.detector.reset(batch)
        torch._dynamo.reset()
        compiled = result.compile()(**result.example)
    equal, diff = compare_outputs(reference, compiled)
    assert equal, f"compiled detector differs from the compiled original by {diff}"
    readings = result.detector.read()
    assert readings and all(r.rows > 0 and r.flagged == 0 for r in readings)


def test_store_logits_reuses_a_store_the_softmax_already_reads() -> None:
    """Where the softmax's input is a store already (the scaled scores' store of a layer with no
    masking op, or a second call), ``store_logits`` returns it and adds no second store."""
    from passes.match_attention import match_attention

    result = instrument("gpt2", tiny=True, locations=[])
    gm = result.gm
    site = match_attention(gm)[0]
    first = insert_checks_module.store_logits(gm, site)
    assert insert_checks_module.store_logits(gm, site) is first
    stores = [n for n in gm.graph.nodes if n.target is runtime.stored_when_compiling]
    assert stores == [first] and site.softmax.args[0] is first
