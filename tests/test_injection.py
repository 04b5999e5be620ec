"""Injection nodes: off means bitwise identical, on means exactly the asked bits of the asked
element, for every model family, location and dtype."""
from __future__ import annotations

import math

import pytest
import torch

from fxsdc.bits import flip_value, parse_dtype
from fxsdc.faults import Fault, FaultInjector, InjectionConfig, InjectionLocation
from fxsdc.pipeline import compare_outputs, instrument
from fxsdc.errors import UserError
from passes.match_attention import LOCATIONS

from .conftest import tiny_instrumented
from .helpers import node_values, per_sample


def test_faults_off_is_bitwise_identical(tiny_model):
    x = tiny_model.example
    with torch.no_grad():
        equal, diff = compare_outputs(tiny_model.original(**x), tiny_model(**x))
    assert equal and diff == 0.0


def _random_fault(result, location, layer, bit, seed):
    batch, seq = result.example["input_ids"].shape
    gen = torch.Generator().manual_seed(seed)
    fault = result.faults.random_fault(layer, location, (bit,), seed % batch, seq, gen)
    return fault, result.faults.site(layer, location)


@pytest.mark.parametrize("location", LOCATIONS)
def test_flip_lands_exactly_where_asked(tiny_model, location):
    x = tiny_model.example
    for seed, bit in [(0, 30), (1, 31), (2, 3)]:
        fault, site = _random_fault(tiny_model, location, 1, bit, seed)
        clean = node_values(tiny_model.gm, x, {site.inject_node})[site.inject_node]
        tiny_model.faults.set_faults([fault], *x["input_ids"].shape)
        hit = node_values(tiny_model.gm, x, {site.inject_node})[site.inject_node]
        record = tiny_model.faults.applied()[0]
        tiny_model.faults.clear()

        clean_s, hit_s = per_sample(clean, site.sample_shape), per_sample(hit, site.sample_shape)
        before = clean_s[fault.index].item()
        assert record["before"] == before
        assert record["after"] == flip_value(before, [bit], torch.float32)
        assert hit_s[fault.index].item() == record["after"] or math.isnan(record["after"])
        changed = (clean_s.view(torch.int32) != hit_s.view(torch.int32)).nonzero().tolist()
        assert changed == [list(fault.index)]


@pytest.mark.parametrize("location", ["scores", "q"])
def test_eager_flip_with_grad_matches_no_grad(tiny_model, location):
    """Eagerly, a site flipped on a copy in place (no grad; the scaled scores) or in place (q)
    and the same site under grad mode with parameters requiring grad (no in-place writes, which
    autograd would refuse: a mask tensor XOR-ed in) give bitwise the same output and records, and
    the flipped forward still backpropagates."""
    x = tiny_model.example
    fault, _ = _random_fault(tiny_model, location, 1, 30, 3)
    tiny_model.faults.set_faults([fault], *x["input_ids"].shape)
    with torch.no_grad():
        plain = tiny_model(**x)
    plain_record = tiny_model.faults.applied()[0]
    tiny_model.faults.set_faults([fault], *x["input_ids"].shape)
    params = [p for p in tiny_model.gm.parameters() if p.is_floating_point()]
    assert params and all(p.requires_grad for p in params)
    with torch.enable_grad():
        graded = tiny_model.gm(**x)  # the graph itself: calling the result runs under no_grad
        graded["logits"].float().sum().backward()
    record = tiny_model.faults.applied()[0]
    backpropagated = any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    tiny_model.faults.clear()
    tiny_model.gm.zero_grad(set_to_none=True)  # the instrumented model is shared between tests
    assert compare_outputs(plain, {k: v.detach() for k, v in graded.items()
                                   if isinstance(v, torch.Tensor)})[0]
    assert record == plain_record
    assert backpropagated


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "float64"])
def test_flip_in_each_dtype(dtype):
    """Every width, float64 included: its 64-bit masks do not fit a select word, so its slots
    read the fault table's ``mask`` (see :mod:`fxsdc.runtime`)."""
    result = instrument("gpt2", tiny=True, dtype=parse_dtype(dtype), locations=["scores", "v"])
    x = result.example
    width = {"float64": 64, "float32": 32}.get(dtype, 16)
    for location, bit in [("scores", width - 2), ("v", width - 1), ("scores", 2)]:
        fault, site = _random_fault(result, location, 0, bit, bit)
        clean = node_values(result.gm, x, {site.inject_node})[site.inject_node]
        result.faults.set_faults([fault], *x["input_ids"].shape)
        hit = node_values(result.gm, x, {site.inject_node})[site.inject_node]
        record = result.faults.applied()[0]
        result.faults.clear()
        before = clean[fault.index]
        assert hit.dtype == parse_dtype(dtype)
        int_dtype = {64: torch.int64, 32: torch.int32, 16: torch.int16}[width]
        xor = int(before.view(int_dtype)) ^ int(hit[fault.index].view(int_dtype))
        assert xor & ((1 << width) - 1) == 1 << bit
        assert record["before"] == float(before)


def test_bit_out_of_range_for_dtype_is_refused():
    result = tiny_instrumented("gpt2")
    with pytest.raises(UserError, match="out of range"):
        result.faults.validate(Fault(0, "scores", (0, 0, 0, 0), (32,)), 3, 13)


@pytest.mark.parametrize("index", [(3, 0, 0, 0), (0, 4, 0, 0), (0, 0, 13, 0), (0, 0, 0, 13),
                                   (0, 0, 0), (0, 0, 0, -1)])
def test_index_outside_the_tensor_is_refused(index):
    result = tiny_instrumented("gpt2")
    with pytest.raises(UserError, match="outside"):
        result.faults.validate(Fault(0, "scores", index, (30,)), 3, 13)


def test_many_trials_in_one_pass_equal_one_trial_per_pass():
    """One fault per batch element in one pass gives each sample the output it gets alone."""
    result = tiny_instrumented("gpt2")
    x = result.example
    batch, seq = x["input_ids"].shape
    faults = [Fault(1, "scores", (0, 1, 4, 2), (30,)), Fault(0, "v", (1, 3, 7, 5), (30,)),
              Fault(1, "weights", (2, 0, 9, 9), (29,))]
    result.faults.set_faults(faults, batch, seq)
    together = result(**x)["logits"]
    records = result.faults.applied()
    for b, fault in enumerate(faults):
        result.faults.set_faults([fault], batch, seq)
        alone = result(**x)["logits"]
        assert torch.equal(together[b].view(torch.int32), alone[b].view(torch.int32))
        assert result.faults.applied()[0] == records[b]
    result.faults.clear()


def test_fault_table_grows_for_more_faults_than_slots():
    result = instrument("gpt2", tiny=True, locations=["scores"], layers=[0])
    faults = [Fault(0, "scores", (b, 0, 5, 1), (30,)) for b in range(3)]
    assert result.faults.slots == 1
    result.faults.set_faults(faults, 3, 13)
    result(**result.example)
    assert result.faults.slots == 3
    assert all(abs(r["after"]) > 1e30 for r in result.faults.applied())


def test_probabilistic_faults_match_host_recomputation():
    result = instrument("gpt2", tiny=True, locations=["scores"], layers=[0],
                        fault_model="probabilistic")
    x = result.example
    clean = result(**x)["logits"]
    result.faults.set_random(0, "scores", rates=[0.0, 0.01, 0.2], seeds=[1, 2, 3], bits=[30])
    hit = result(**x)["logits"]
    counts = [r["flips"] for r in result.faults.applied()]
    from fxsdc.runtime import random_hits
    expected, _ = random_hits(4 * 13 * 13, torch.tensor([1, 2, 3]),
                              torch.tensor([0.0, 0.01, 0.2]), 32, torch.device("cpu"))
    assert counts == expected.sum(dim=1).tolist()
    assert counts[0] == 0 and counts[2] > counts[1] > 0
    assert torch.equal(hit[0].view(torch.int32), clean[0].view(torch.int32))


def test_unknown_location_and_layer_are_user_errors():
    with pytest.raises(UserError, match="unknown location"):
        instrument("gpt2", tiny=True, locations=["keys"])
    with pytest.raises(UserError, match="out of range"):
        instrument("gpt2", tiny=True, layers=[2])


class TestSeedInjector:
    def test_single_bit_at_index(self):
        t = torch.ones(2, 3, 4, 5)
        injector = FaultInjector(InjectionConfig(InjectionLocation.SCORES, idx=(1, 2, 3, 4),
                                                 bit=31))
        info = injector.inject(t)
        assert t[1, 2, 3, 4] == -1.0 and info["value_before"] == 1.0
        assert info["value_after"] == -1.0 and t.sum() == t.numel() - 2
        assert injector.history == [info]

    def test_random_location_is_seeded_and_multi_bit(self):
        a, b = torch.zeros(4, 4), torch.zeros(4, 4)
        cfg = InjectionConfig("weights", bits=(23, 24), seed=7)
        ia, ib = FaultInjector(cfg).inject(a), FaultInjector(cfg).inject(b)
        assert ia["idx"] == ib["idx"] and torch.equal(a, b)
        assert a[tuple(ia["idx"])] == flip_value(0.0, [23, 24], torch.float32)

    def test_probabilistic_and_disabled(self):
        t = torch.ones(100, 100)
        info = FaultInjector(InjectionConfig("q", bit=30, probability=0.05, seed=1)).inject(t)
        assert 300 < info["flips"] < 700 and int((t != 1).sum()) == info["flips"]
        u = torch.ones(3)
        assert not FaultInjector(InjectionConfig("q", enabled=False)).inject(u)["enabled"]
        assert torch.equal(u, torch.ones(3))

    def test_bad_index_and_bit(self):
        with pytest.raises(UserError):
            FaultInjector(InjectionConfig("q", idx=(5, 0))).inject(torch.zeros(2, 2))
        with pytest.raises(UserError):
            FaultInjector(InjectionConfig("q", idx=(0, 0), bit=16)).inject(
                torch.zeros(2, 2, dtype=torch.bfloat16))


def test_faults_on_the_same_element_compose():
    result = tiny_instrumented("gpt2")
    x = result.example
    fault_a = Fault(0, "q", (1, 2, 3, 4), (30,))
    fault_b = Fault(0, "q", (1, 2, 3, 4), (3, 30))  # bit 30 twice cancels: net flip of bit 3
    result.faults.set_faults([fault_a, fault_b], 3, 13)
    result(**x)
    records = result.faults.applied()
    result.faults.clear()
    assert result.faults.slots >= 1 and records[0] == {**records[1], "bits": [30]}
    assert records[0]["after"] == flip_value(records[0]["before"], [3], torch.float32)


def test_traced_graph_equals_the_hugging_face_model(tiny_model):
    """The traced original is the model: bitwise the same output as HF's own forward."""
    x = tiny_model.example
    with torch.no_grad():
        hf = tiny_model.loaded.model(**x)
        traced = tiny_model.original(**x)
    key = "logits" if "logits" in traced else "last_hidden_state"
    assert compare_outputs({key: hf[key]}, {key: traced[key]})[0]


def test_probabilistic_seed_selects_the_elements():
    from fxsdc.runtime import random_hits
    hits, bits = random_hits(4096, torch.tensor([1, 2, 1]), torch.tensor([0.05] * 3), 32,
                             torch.device("cpu"))
    assert torch.equal(hits[0], hits[2]) and torch.equal(bits[0], bits[2])
    assert not torch.equal(hits[0], hits[1])
    assert 100 < int(hits[0].sum()) < 320  # about 5 % of 4096


def test_take_elements_reads_flat_offsets_of_strided_views():
    """The records' opaque op reads x at flat row-major offsets whatever x's strides (a permuted
    slice of a GEMM output, as q, k and v are), and its fake kernel agrees with it (opcheck)."""
    base = torch.randn(2, 5, 3, 4, 6)
    x = base[:, :, 1].permute(0, 2, 1, 3)  # (2, 4, 5, 6), not contiguous
    index = torch.tensor([0, 7, 61, x.numel() - 1])
    taken = torch.ops.fxsdc.take_elements(x, index)
    assert torch.equal(taken, x.contiguous().view(-1)[index])
    torch.library.opcheck(torch.ops.fxsdc.take_elements.default, (x, index))


def test_xor_elements_flips_flat_offsets_of_strided_views():
    """The in-place flip XORs x at flat row-major offsets whatever x's strides, writing through
    to the GEMM output x is a view of, and returns the values before; its fake kernel agrees
    with it (opcheck)."""
    base = torch.randn(2, 5, 3, 4, 6, generator=torch.Generator().manual_seed(0))
    x = base[:, :, 1].permute(0, 2, 1, 3)  # (2, 4, 5, 6), not contiguous
    index = torch.tensor([0, 7, 61, x.numel() - 1])
    bits = torch.tensor([-2**31, 1 << 30, 1, 0], dtype=torch.int32)  # the sign bit, as stored
    expected = x.contiguous().view(-1).view(torch.int32).clone()  # bits: flips may make NaNs
    expected[index] ^= bits
    before = base.clone()
    values = torch.ops.fxsdc.xor_elements_(x, index, bits)
    assert torch.equal(values, before[:, :, 1].permute(0, 2, 1, 3).reshape(-1)[index])
    assert torch.equal(x.reshape(-1).view(torch.int32), expected)
    others = torch.ones_like(base, dtype=torch.bool)
    others[:, :, 1] = False
    assert torch.equal(base[others], before[others])  # the other pieces are untouched
    clean = before[:, :, 1].permute(0, 2, 1, 3)  # opcheck compares values: no NaN
    low_bits = torch.tensor([1, 2, 4, 0], dtype=torch.int32)
    torch.library.opcheck(torch.ops.fxsdc.xor_elements_.default, (clean, index, low_bits))


@pytest.mark.parametrize("location", ["v", "weights", "scores"])  # in place, in place, select
def test_idle_slots_on_an_active_slots_element_keep_its_flip(location):
    """Idle slots read and write an element too (the first, clamped from offset -1): a fault on
    that element must survive them, with the same output and record as with one slot."""
    outputs, records = [], []
    for slots in (1, 3):
        result = instrument("gpt2", tiny=True, locations=[location], layers=[0], slots=slots)
        result.faults.set_faults([Fault(0, location, (0, 0, 0, 0), (30,))], 3, 13)
        outputs.append(result(**result.example)["logits"])
        records.append(result.faults.applied())
    assert torch.equal(outputs[0].view(torch.int32), outputs[1].view(torch.int32))  # NaN too
    assert records[0] == records[1]
    assert abs(records[0][0]["after"]) > 1e30  # bit 30 of a value below 2 in magnitude
