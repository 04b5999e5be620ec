"""torch.compile of an instrumented graph: identical when faults are off, and one compiled graph
for every fault (switching faults must not recompile). Compiling takes tens of seconds on two
cores, so one module-scoped compile serves all the assertions."""
from __future__ import annotations

import math
import re

import pytest
import torch
import torch._dynamo
import torch._inductor.config
import transformers
from torch._inductor.utils import run_and_get_code
from torch._dynamo.utils import counters

from fxsdc import runtime
from fxsdc.bits import flip_value, layout
from fxsdc.faults import Fault
from fxsdc.pipeline import compare_outputs, instrument

from .helpers import token_inputs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def compiled():
    torch._dynamo.reset()
    # A slot per batch element, every check: the graph a sweep compiles once.
    result = instrument("gpt2", tiny=True, slots=3, checks=("bounds", "softmax", "abft"))
    result.detector.reset(3)
    with torch.no_grad():
        reference = torch.compile(result.original)(**result.example)
        module = result.compile()
        first = module(**result.example)
    return result, module, reference, first


def test_faults_off_matches_compiled_original_bitwise(compiled):
    result, _, reference, first = compiled
    equal, diff = compare_outputs(reference, first)
    assert equal, f"compiled instrumented graph differs from compiled original by {diff}"
    assert result.detector.total_flagged() == 0  # the first (clean) compiled pass


def _layer_flags(result, layer: int) -> dict:
    return {(r.info.check, r.info.op): r.per_sample for r in result.detector.read()
            if r.info.layer == layer}


def test_switching_faults_does_not_recompile(compiled, monkeypatch):
    result, module, _, first = compiled
    x = result.example
    frames = counters["stats"]["unique_graphs"]
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    faults = [Fault(0, "scores", (1, 2, 3, 2), (30,)), Fault(1, "v", (0, 1, 5, 3), (31,)),
              Fault(0, "weights", (2, 0, 5, 3), (30,)), Fault(1, "q", (2, 3, 12, 15), (1, 30)),
              # the element the idle slots clamp onto, flipped in place
              Fault(1, "out", (0, 0, 0, 0), (30,))]
    for fault in faults:
        result.faults.set_faults([fault], 3, 13)
        result.detector.reset()
        with torch.no_grad():
            out = module(**x)
        compiled_record = result.faults.applied()[0]
        compiled_flags = _layer_flags(result, fault.layer)
        result.detector.reset()
        with torch.no_grad():
            result.gm(**x)
        eager_record = result.faults.applied()[0]
        # The checks of the faulted layer agree. Later layers may not: a huge value overflows
        # to inf in eager LayerNorm but not in inductor's, which computes it differently.
        assert compiled_flags == _layer_flags(result, fault.layer)
        assert any(per_sample[fault.index[0]] for per_sample in compiled_flags.values())
        # The same element and bits; the values agree up to compiled-vs-eager rounding, and
        # the compiled flip is exact on the compiled value.
        assert {k: compiled_record[k] for k in ("layer", "location", "index", "bits")} == \
            {k: eager_record[k] for k in ("layer", "location", "index", "bits")}
        assert compiled_record["before"] == pytest.approx(eager_record["before"], rel=1e-4)
        assert compiled_record["after"] == flip_value(compiled_record["before"], fault.bits,
                                                      torch.float32)
        assert not compare_outputs(first, out)[0]
    result.faults.set_faults(faults[:3], 3, 13)  # several trials in one pass: same graph
    with torch.no_grad():
        module(**x)
    result.faults.clear()
    with torch.no_grad():
        off = module(**x)
    assert compare_outputs(first, off)[0]
    assert counters["stats"]["unique_graphs"] == frames


def _generated_code(module, inputs: dict[str, torch.Tensor], config: dict) -> str:
    """Inductor's generated code for ``module`` under inductor ``config``; the FX graph cache is
    off so that the code is generated, not loaded."""
    with torch._inductor.config.patch({"fx_graph_cache": False, **config}), torch.no_grad():
        _, code = run_and_get_code(torch.compile(module), **inputs)
    return "\n".join(code)


def _attention_sized_buffers(code: str, numel: int) -> list[str]:
    """The buffers of at least ``numel`` elements that generated ``code`` allocates (its
    ``empty_strided`` calls), as their shape strings."""
    shapes = re.findall(r"empty_strided_cpu\(\(([\d, ]+)\)", code)
    return [s for s in shapes if torch.Size(int(d) for d in s.split(",") if d.strip()).numel()
            >= numel]


def _buffer_numels(code: str) -> dict[str, int]:
    """Element counts of the buffers and inputs that generated ``code`` names: its allocations,
    reinterpretations, reuses and input size asserts."""
    def numel(dims: str) -> int:
        return math.prod(int(d) for d in dims.split(",") if d.strip())

    numels = {name: numel(dims) for pattern in (
        r"^\s+(buf\d+) = empty_strided_cpu\(\(([\d, ]*)\)",
        r"^\s+(buf\d+) = reinterpret_tensor\(buf\d+, \(([\d, ]*)\)",
        r"assert_size_stride\((arg\d+_1), \(([\d, ]*)\)")
        for name, dims in re.findall(pattern, code, flags=re.MULTILINE)}
    for name, source in re.findall(r"^\s+(buf\d+) = (buf\d+); del", code, flags=re.MULTILINE):
        numels[name] = numels.get(source, 0)  # reuses follow their source in the code
    return numels


def _passes_over(code: str, numel: int) -> list[str]:
    """The generated C++ kernels that the compiled forward calls with a buffer of at least
    ``numel`` elements: its passes over memory. (Kernels over a few elements, such as a fault
    table's arithmetic, are not.)"""
    numels = _buffer_numels(code)
    return [kernel for kernel, args in re.findall(r"^\s+(cpp_fused_\w+)\(([^)]*)\)", code,
                                                  flags=re.MULTILINE)
            if max(numels.get(a.strip(), 0) for a in args.split(",")) >= numel]


# Inductor stores a reused pointwise node of more than 50 operations on CPUs, 30 on GPUs: the
# CPU backend under the GPUs' threshold shows the fusion decisions a GPU would make.
@pytest.mark.parametrize("config", [{}, {"realize_opcount_threshold": 30}],
                         ids=["cpu-heuristics", "gpu-heuristics"])
def test_idle_injection_adds_no_pass_and_no_attention_sized_buffer(config):
    """With faults off, the injection nodes at every location must not make inductor
    materialise another (B, H, T, T) tensor nor make another pass over memory: the sites the
    model stores anyway are flipped in place, and the scores' select is fused into the softmax
    (only the fault table's few elements get kernels of their own). On a GPU, where
    attention is memory-bound, every extra pass over the scores or weights costs time and
    memory (the H200 run of the earlier records, which read the element before the flip,
    showed +20 % compiled peak with faults off)."""
    result = instrument("gpt2", tiny=True)
    batch, seq = 2, 64  # T > head dim: (B, H, T, D) tensors are smaller than the scores
    heads = result.sites[0].shape_for(seq)[0]
    inputs = token_inputs(result.original.config.vocab_size, batch, seq)
    scores = batch * heads * seq * seq
    original = _generated_code(result.original, inputs, config)
    instrumented = _generated_code(result.gm, inputs, config)
    assert _attention_sized_buffers(original, scores), \
        "the original allocates its scores; the probe must see them"
    assert len(_attention_sized_buffers(instrumented, scores)) <= \
        len(_attention_sized_buffers(original, scores))
    # A pass is a kernel over a tensor of at least B x T elements (a per-token quantity).
    assert len(_passes_over(original, batch * seq)) > 3, "the probe must see the original's"
    assert len(_passes_over(instrumented, batch * seq)) == len(_passes_over(original, batch * seq))


def test_idle_injection_adds_no_attention_sized_buffer_to_a_checked_graph():
    """A checked layer's injection nodes store their flipped tensors (its checks read them in
    several loops over each row, where an unstored select would be recomputed in each); with
    faults off the checked graph still allocates no more attention-sized buffers than the same
    checks without injection nodes."""
    checks = ("bounds", "softmax", "abft")  # one layer of the tiny model: half the compile time
    injected = instrument("gpt2", tiny=True, checks=checks, layers=[0])
    plain = instrument("gpt2", tiny=True, checks=checks, locations=[], layers=[0])
    batch, seq = 2, 64
    heads = injected.sites[0].shape_for(seq)[0]
    inputs = token_inputs(injected.original.config.vocab_size, batch, seq)
    scores = batch * heads * seq * seq
    buffers = {}
    for name, result in (("injected", injected), ("plain", plain)):
        result.detector.reset(batch)
        buffers[name] = _attention_sized_buffers(_generated_code(result.gm, inputs, {}), scores)
    assert buffers["plain"], "the checked original allocates its scores; the probe must see them"
    assert len(buffers["injected"]) <= len(buffers["plain"]), buffers


def test_a_detector_without_injection_nodes_stores_what_its_checks_read():
    """Checks without injection nodes (``locations=[]``, what an operator leaves on) get a store
    node at the scaled scores and at the weights (``insert_checks.store_checked_sites``) and at
    the logits (``insert_checks.store_logits``):
    eagerly they pass their input through; compiled, each ends its kernel with an in-place op on
    no element, as an injection node's flip would, and the forward still equals the compiled
    original's bitwise and flags no clean row."""
    torch._dynamo.reset()
    result = instrument("gpt2", tiny=True, locations=[], checks=("bounds", "softmax", "abft"))
    layers = sorted({c.layer for c in result.checks})
    stores = sorted(n.name for n in result.gm.graph.nodes if n.name.startswith("fxsdc_store_"))
    assert layers and stores == sorted(f"fxsdc_store_{location}_{layer}" for layer in layers
                                       for location in ("scores", "weights", "logits"))
    batch = result.example["input_ids"].shape[0]
    result.detector.reset(batch)
    with torch.no_grad():
        assert compare_outputs(result.original(**result.example), result.gm(**result.example))[0]
        reference = torch.compile(result.original)(**result.example)
        compiled, code = run_and_get_code(result.compile(), **result.example)
    equal, diff = compare_outputs(reference, compiled)
    assert equal, f"compiled detector differs from the compiled original by {diff}"
    assert "\n".join(code).count("torch.ops.fxsdc.xor_elements_.default(") == len(stores)
    assert result.detector.total_flagged() == 0


def _parallel_region_entries(code: str) -> list[int]:
    """For each ``#pragma omp parallel`` of generated C++ ``code``, how many times one call of
    its kernel enters it: the product of the trip counts of the ``for`` loops around it (found
    by matching braces upwards: a block opened above and not closed before the pragma encloses
    it; ``for(int64_t x=0L; x<N; x+=S)`` runs ceil(N / S) times)."""
    lines = code.split("\n")
    entries = []
    for i, line in enumerate(lines):
        if "#pragma omp parallel" not in line:
            continue
        depth, count = 0, 1
        for j in range(i - 1, 0, -1):
            if lines[j].startswith('extern "C"'):
                break
            depth += lines[j].count("}") - lines[j].count("{")
            if depth < 0:  # lines[j] opens a block around the pragma
                depth = 0
                header = lines[j - 1].replace("static_cast<int64_t>", "")
                loop = re.search(r"for\(.*<\((\d+)L\);.*\+=\((\d+)L\)\)", header)
                if loop:
                    count *= -(-int(loop.group(1)) // int(loop.group(2)))
        entries.append(count)
    return entries


def test_checks_open_no_parallel_region_per_row():
    """On several threads, inductor's C++ code for a checked layer enters an OpenMP parallel
    region at most once per sample, never inside a loop over rows. With fewer partial sums than
    a vector's 16 lanes (rows of 64 terms as 4 sums of 16, before ``checks._block_shape``), its
    parallel-depth heuristic counted no work in the outer loops and parallelised each row's
    reduction: a region per row, and 12-layer GPT-2 small with all checks at 2 threads went
    from +12 % to +36 % over the original (``tools/bench_results/README.md``)."""
    # GPT-2 small's head dim, 64 (the tiny config's 16 made one partial sum, which inductor
    # squeezed away, and did not show the bug), in a one-layer model of two heads.
    config = transformers.GPT2Config(n_embd=128, n_head=2, n_layer=1, vocab_size=256,
                                     n_positions=64, use_cache=False)
    config._attn_implementation = "eager"  # the softmax the checks match (as models.load_model)
    model = transformers.GPT2LMHeadModel(config).eval()
    result = instrument(model, checks=("bounds", "softmax", "abft"), locations=[])
    batch, seq = 2, 64
    result.detector.reset(batch)
    inputs = token_inputs(config.vocab_size, batch, seq)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # inductor writes OpenMP code only for more than one thread
    try:
        code = _generated_code(result.gm, inputs, {})
    finally:
        torch.set_num_threads(threads)
    entries = _parallel_region_entries(code)
    assert entries, "the probe must see parallel regions"
    # At most one region per sample (the detector's per-sample counts reduce each sample's rows).
    assert max(entries) <= batch, entries


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_idle_scores_select_keeps_16bit_kernels_vectorised(dtype):
    """With faults off, the scores' select must leave the 16-bit softmax kernel as vectorised
    as the original's. Its flipped value was a 16-bit bit cast, which inductor's C++ backend
    does not vectorise: the kernel became a scalar loop, slower, and calling a scalar ``exp``
    instead of the original's vector one, so the logits changed in their last bits (GPT-2
    small, bfloat16, 4 x 256; a one-layer, 64-wide GPT-2 at 2 x 512 with some inputs)."""
    result = instrument("gpt2", tiny=True, dtype=dtype)
    inputs = token_inputs(result.original.config.vocab_size, 2, 64)
    original = _generated_code(result.original, inputs, {})
    instrumented = _generated_code(result.gm, inputs, {})
    assert "exp()" in original, "the probe must see the original's vector exp"
    assert instrumented.count("std::exp(") <= original.count("std::exp(")
    with torch.no_grad():
        equal, diff = compare_outputs(torch.compile(result.original)(**inputs),
                                      result.compile()(**inputs))
    assert equal, f"compiled instrumented graph differs from compiled original by {diff}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_compiled_scores_select_puts_the_flipped_bits_in_place(dtype):
    """The scaled scores, which compiled models never store, get the flipped value through a
    select: exactly the bits the eager flip gives, for a sign, an exponent and a mantissa
    bit in each packed width."""
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 3, 16, 8, generator=gen).to(dtype) for _ in range(2))

    def scaled_scores(q, k, word, mask, before, after):
        product = q @ k.transpose(-1, -2)
        return runtime.inject_bitflips(product / 8, 0, 0, word, mask, before, after,
                                       source=product, scale=8.0, divide=True)

    compiled = torch.compile(scaled_scores, fullgraph=True)
    width = torch.finfo(dtype).bits
    int_dtype = layout(dtype).int_dtype
    clean = (q @ k.transpose(-1, -2)) / 8
    for offset, bit in [(37, width - 1), (500, width - 3), (1000, 2)]:
        tables = [torch.tensor([[runtime.select_word(offset, 1 << bit, True)]]),
                  torch.zeros(1, dtype=torch.int64)] + \
                 [torch.full((1,), math.nan, dtype=torch.float64) for _ in range(2)]
        eager = scaled_scores(q, k, *tables)
        with torch.no_grad():
            flipped = compiled(q, k, *tables)
        changed = (eager.view(int_dtype) ^ clean.view(int_dtype)).flatten()
        assert changed.nonzero().flatten().tolist() == [offset]
        assert torch.equal(flipped.view(int_dtype), eager.view(int_dtype)), (offset, bit)
