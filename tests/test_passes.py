"""The passes on their own, on hand-written attention traced with plain torch.fx."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from fxsdc.bits import flip_value
from fxsdc.faults import Fault, FaultController
from passes.graph_view import normalized_text
from passes.insert_checks import insert_checks
from passes.insert_injection import insert_fault_injection
from passes.match_attention import LOCATIONS, AttentionNotFound, match_attention
from passes.ops import is_op
from passes.shapes import propagate_shapes


class Attention(nn.Module):
    """Multi-head self-attention spelled with different ops than any HF model: operator @,
    Tensor.softmax, a multiplicative scale and a boolean causal mask."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.register_buffer("causal", torch.ones(5, 5, dtype=torch.bool).tril())  # seq 5 only

    def split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.head_dim).permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        scores = (q @ k.transpose(-1, -2)) * self.head_dim ** -0.5
        weights = scores.masked_fill(~self.causal, float("-inf")).softmax(dim=-1)
        out = (weights @ v).permute(0, 2, 1, 3).reshape(x.shape)
        return self.o(out)


def traced(module: nn.Module, x: torch.Tensor) -> fx.GraphModule:
    gm = fx.symbolic_trace(module)
    (name,) = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    return propagate_shapes(gm, {name: x})


@pytest.fixture
def attention():
    torch.manual_seed(0)
    module = Attention().eval()
    x = torch.randn(3, 5, 16)
    return module, x, traced(module, x)


def test_equivalence_table_matches_every_spelling():
    graph = fx.Graph()
    a, b = graph.placeholder("a"), graph.placeholder("b")
    for node in (graph.call_function(torch.matmul, (a, b)), graph.call_function(torch.bmm, (a, b)),
                 graph.call_function(operator.matmul, (a, b)), graph.call_method("matmul", (a, b))):
        assert is_op(node, "matmul") and not is_op(node, "softmax")
    for node in (graph.call_function(F.softmax, (a,)), graph.call_function(torch.softmax, (a, -1)),
                 graph.call_method("softmax", (a,))):
        assert is_op(node, "softmax")


def test_matcher_finds_the_sites_whatever_the_node_names(attention):
    module, x, gm = attention
    for node in gm.graph.nodes:  # names must not matter: scramble them
        if node.op not in ("placeholder", "output", "get_attr", "call_module"):
            node.name = f"n{id(node) % 10_000_000}"
    (site,) = match_attention(gm)
    assert site.softmax.target == "softmax" and site.scale is not None
    assert [site.q_proj.target, site.k_proj.target, site.v_proj.target, site.out_proj.target] == \
        ["q", "k", "v", "o"]
    assert site.scores in site.scale_ops and site.mask_ops[0].target == "masked_fill"
    assert [site.node(loc).target for loc in ("q", "k", "v")] == ["permute"] * 3


def test_no_attention_is_a_clear_error():
    mlp = nn.Sequential(nn.Linear(4, 4), nn.Softmax(dim=-1))
    with pytest.raises(AttentionNotFound, match="no attention found"):
        match_attention(traced(mlp, torch.randn(2, 4)))


def test_injection_pass_leaves_its_input_alone_and_keeps_values(attention):
    module, x, gm = attention
    before = normalized_text(gm)
    injected = insert_fault_injection(gm, locations=["scores", "v"])
    assert normalized_text(gm) == before
    assert [s.location for s in injected.meta["fxsdc_sites"]] == ["scores", "v"]
    assert torch.equal(injected(x), module(x))


def test_scores_records_replay_the_scaling_on_the_product(attention):
    """The scores' records are read from q·kᵀ (a GEMM output) and scaled as the model scales
    them (here ``* head_dim ** -0.5``), bitwise the value the flip hit."""
    module, x, gm = attention
    injected = insert_fault_injection(gm, locations=["scores"])
    (node,) = [n for n in injected.graph.nodes if n.name.startswith("fxsdc_inject_scores")]
    (site,) = match_attention(gm)
    assert node.kwargs["source"].name == site.qk.name and node.kwargs["divide"] is False
    assert node.kwargs["scale"] == module.head_dim ** -0.5
    # The matcher follows the values, not the records' edge from q·kᵀ to the injection node.
    (again,) = match_attention(injected)
    assert again.scale == (module.head_dim ** -0.5, False) and again.scores.name == site.scores.name
    faults = FaultController(injected)
    faults.set_faults([Fault(0, "scores", (2, 1, 4, 3), (30, 1))], 3, 5)
    scores = (module.split(module.q(x)) @ module.split(module.k(x)).transpose(-1, -2)) \
        * module.head_dim ** -0.5
    injected(x)
    (record,) = faults.applied()
    assert record["before"] == scores[2, 1, 4, 3].item()
    assert record["after"] == flip_value(record["before"], (30, 1), torch.float32)


def test_check_pass_flags_nothing_clean_and_a_corrupted_product(attention):
    module, x, gm = attention
    checked = insert_checks(insert_fault_injection(gm, locations=["out"]), {"x": x})
    assert torch.equal(checked(x), module(x))
    assert int(checked.fxsdc_check_rows[:, 1].sum()) == 0
    FaultController(checked).set_faults([Fault(0, "out", (1, 0, 0, 7), (30,))], 3, 5)
    checked(x)
    pv = next(c for c in checked.meta["fxsdc_checks"] if c.op == "pv")
    assert checked.fxsdc_check_samples[pv.check_id].tolist()[:3] == [0, 1, 0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_head_columns_of_wide_16_bit_projections(dtype):
    """Column indices beyond a 16-bit format's exact integers (bfloat16: 256) still reach the
    heads intact: GPT-2's fused c_attn with 1152 columns, the same map as in float32."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from fxsdc.models import sample_inputs
    from fxsdc.tracing import trace
    from passes.insert_checks import head_columns

    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=384, n_head=6, vocab_size=64, n_positions=32)
    config._attn_implementation = "eager"  # as fxsdc.models loads them: traceable attention
    model = GPT2LMHeadModel(config).eval()
    example = sample_inputs(model, 2, 9)
    maps = []
    for model_dtype in (torch.float32, dtype):
        gm = propagate_shapes(trace(model.to(model_dtype)), example)
        (site,) = match_attention(gm)
        pairs = [(site.projection(loc), site.node(loc)) for loc in ("q", "k", "v")]
        maps.append(head_columns(gm, example, pairs))
    for (index32, scale32), (index16, scale16) in zip(*maps):
        assert torch.equal(index16, index32) and scale16 == scale32
    assert int(maps[1][2][0].max()) == 3 * 384 - 1  # v's last column, beyond 2^8 and 2^11


@pytest.mark.parametrize("name, dtype, modes", [
    # q/k/v: views of the fused projection's addmm; scores: q·kᵀ, divided by a constant
    ("gpt2", torch.float32, "iiivii"),
    # q is scaled after its projection, so the product is the scores
    ("facebook/opt-125m", torch.float32, "siiiii"),
    # softmax in float32, cast to bfloat16 before the product: the weights are never stored
    ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", torch.bfloat16, "iiivsi"),
])
def test_injection_mode_follows_what_the_model_stores(name, dtype, modes):
    """Sites that torch.compile stores anyway (a GEMM's output, the weights feeding the second
    GEMM) are flipped in place (i); the scaled scores by a select of values flipped from q·kᵀ
    (v), with the records read from the product; the rest by a select of flipped elements (s)."""
    import fxsdc
    result = fxsdc.instrument(name, tiny=True, layers=[0], dtype=dtype)
    nodes = result.gm.graph.find_nodes(op="call_function", target=fxsdc.runtime.inject_bitflips)
    assert len(nodes) == len(result.sites)
    expected = dict(zip(LOCATIONS, modes))  # modes in LOCATIONS' order
    found = {n.meta["fxsdc_site"][1]: "i" if n.kwargs.get("in_place") else
             "v" if "source" in n.kwargs else "s" for n in nodes}
    assert found == expected
