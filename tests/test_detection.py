"""Online checks in the graph: zero false alarms on clean inputs, and detection of faults."""
from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from fxsdc.bits import parse_dtype
from fxsdc.faults import Fault
from fxsdc.pipeline import instrument
from passes.match_attention import LOCATIONS

from .conftest import TINY_MODELS, tiny_instrumented
from .test_minilm import minilm

ALL_CHECKS = ("bounds", "softmax", "abft")


@functools.lru_cache(maxsize=None)
def checked(name: str, dtype: str = "float32"):
    return instrument(name, tiny=True, checks=ALL_CHECKS, dtype=parse_dtype(dtype))


def random_inputs(vocab: int, batch: int, seq: int, pads: list[int], seed: int):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for b, pad in enumerate(pads[:batch]):
        mask[b, seq - min(pad, seq - 1):] = 0  # at least one real token per row
    return {"input_ids": ids, "attention_mask": mask}


def flagged_rows(result, inputs) -> list:
    result.detector.reset(inputs["input_ids"].shape[0])
    with torch.no_grad():
        result.gm(**inputs)
    return [(r.info.layer, r.info.check, r.info.op, r.max_score)
            for r in result.detector.read() if r.flagged]


@pytest.mark.parametrize("name", TINY_MODELS)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.integers(1, 4), seq=st.integers(2, 24),
       pads=st.lists(st.integers(0, 23), min_size=4, max_size=4), seed=st.integers(0, 2**16))
def test_no_false_alarm_on_clean_inputs(name, batch, seq, pads, seed):
    result = checked(name)
    inputs = random_inputs(result.gm.config.vocab_size if hasattr(result.gm, "config")
                           else 512, batch, seq, pads, seed)
    assert flagged_rows(result, inputs) == []


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seq=st.integers(2, 24), pads=st.lists(st.integers(0, 23), min_size=4, max_size=4),
       seed=st.integers(0, 2**16))
def test_no_false_alarm_in_16_bit_models(dtype, seq, pads, seed):
    for name in ("gpt2", "TinyLlama/TinyLlama-1.1B-Chat-v1.0"):
        result = checked(name, dtype)
        assert flagged_rows(result, random_inputs(512, 4, seq, pads, seed)) == []


def test_no_false_alarm_on_pretrained_minilm_real_text():
    loaded, inputs = minilm()
    result = instrument(loaded.model, checks=ALL_CHECKS, example_inputs=inputs)
    readings_rows = flagged_rows(result, inputs)
    assert readings_rows == []
    readings = result.detector.read()
    assert {(r.info.layer, r.info.check) for r in readings} >= {
        (layer, check) for layer in range(6) for check in ALL_CHECKS}
    assert all(r.rows > 0 for r in readings)


def test_detection_is_per_sample_and_by_the_right_check():
    result = checked("gpt2")
    x = result.example
    faults = [Fault(1, "k", (0, 1, 5, 3), (30,)), Fault(0, "weights", (1, 2, 4, 4), (30,)),
              Fault(1, "scores", (2, 1, 3, 3), (30,))]
    result.faults.set_faults(faults, 3, 13)
    result.detector.reset(3)
    with torch.no_grad():
        result.gm(**x)
    result.faults.clear()
    verdicts = result.detector.flagged_samples()
    by_op = {(r.info.layer, r.info.op, r.info.check): r.per_sample
             for r in result.detector.read() if r.flagged}
    assert verdicts["abft"][0] and verdicts["abft"][2]
    assert verdicts["bounds"][1] and verdicts["softmax"][1]
    assert by_op[(1, "k_proj", "abft")][0] > 0  # the producer of k sees the fault in k
    assert by_op[(1, "qk", "abft")][2] > 0  # a scores fault is seen by the q·kᵀ checksum
    assert by_op[(0, "softmax", "bounds")] == (0, 1, 0)


def test_detector_state_accumulates_until_reset():
    result = checked("gpt2")
    x = result.example
    result.faults.set_faults([Fault(0, "out", (2, 0, 3, 1), (30,))], 3, 13)
    result.detector.reset(3)
    with torch.no_grad():
        result.gm(**x)
        result.gm(**x)
    result.faults.clear()
    pv = next(r for r in result.detector.read() if r.info.op == "pv" and r.info.layer == 0)
    assert pv.flagged == 2 and pv.per_sample == (0, 0, 2)
    assert pv.first_row == 2 * 4 * 13 + 0 * 13 + 3  # row (b=2, h=0, i=3) of a (3, 4, 13) grid
    assert pv.max_score > 1
    result.detector.reset()
    assert result.detector.total_flagged() == 0


@pytest.mark.parametrize("location", LOCATIONS)
def test_bit30_flips_in_pretrained_minilm_are_detected_online(location):
    """>= 95 % of bit-30 flips at random elements of layer 3 are flagged in one pass."""
    loaded, inputs = minilm()
    samples = 40  # trials per forward pass: one fault per batch element
    batch = {k: v.repeat(samples // v.shape[0] + 1, 1)[:samples] for k, v in inputs.items()}
    result = _minilm_checked(samples)
    seq = batch["input_ids"].shape[1]
    gen = torch.Generator().manual_seed(LOCATIONS.index(location))
    detected = total = 0
    for _ in range(5):
        faults = [result.faults.random_fault(3, location, (30,), b, seq, gen)
                  for b in range(samples)]
        result.faults.set_faults(faults, samples, seq)
        result.detector.reset(samples)
        with torch.no_grad():
            result.gm(**batch)
        flags = result.detector.flagged_samples()
        detected += sum(any(flags[c][b] for c in flags) for b in range(samples))
        total += samples
    result.faults.clear()
    assert detected / total >= 0.95, f"{location}: {detected}/{total} detected"


@functools.lru_cache(maxsize=1)
def _minilm_checked(samples: int):
    loaded, inputs = minilm()
    batch = {k: v.repeat(samples // v.shape[0] + 1, 1)[:samples] for k, v in inputs.items()}
    return instrument(loaded.model, checks=ALL_CHECKS, layers=[3], example_inputs=batch,
                      slots=samples)


@functools.lru_cache(maxsize=None)
def kv_equal(name: str):
    return instrument(name, tiny=True, checks=("comb",), force_kv_equal=True)


@pytest.mark.parametrize("name", ["gpt2", "bert-base-uncased", "facebook/opt-125m"])
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.integers(1, 4), seq=st.integers(2, 24),
       pads=st.lists(st.integers(0, 23), min_size=4, max_size=4), seed=st.integers(0, 2**16))
def test_q_at_o_bounds_raise_no_false_alarm_when_k_equals_v(name, batch, seq, pads, seed):
    assert flagged_rows(kv_equal(name), random_inputs(512, batch, seq, pads, seed)) == []


def test_comb_flags_what_either_bounds_path_flags():
    result = kv_equal("gpt2")
    faults = [Fault(1, "weights", (0, 1, 5, 3), (30,)), Fault(1, "out", (1, 1, 5, 3), (30,))]
    result.faults.set_faults(faults, 3, 13)
    result.detector.reset(3)
    with torch.no_grad():
        result.gm(**result.example)
    result.faults.clear()
    verdicts = result.detector.flagged_samples()
    # A weights fault breaks both paths; an output fault only the q@o path, which reads o.
    assert verdicts["bounds"][:2] == [True, False]
    assert verdicts["bounds-qo"][:2] == [True, True]
    assert verdicts["comb"][:2] == [True, True]


def test_q_at_o_needs_k_equal_v():
    from fxsdc.errors import UserError
    with pytest.raises(UserError, match="K = V"):
        instrument("gpt2", tiny=True, checks=("bounds-qo",))
    with pytest.raises(UserError, match="K != V"):  # rotary embeddings rotate k, not v
        instrument("TinyLlama/TinyLlama-1.1B-Chat-v1.0", tiny=True, checks=("comb",),
                   force_kv_equal=True)


def _record_reference(passes: list[torch.Tensor], batch: int) -> tuple[list, float, int, list]:
    """The detector state after ``passes`` of one check, from plain Python over the scores."""
    rows, best, first, samples = [0, 0], 0.0, -1, [0] * batch  # as state_buffers starts
    for score in passes:
        flat = score.reshape(-1).tolist()
        per = len(flat) // batch
        flagged = [i for i, v in enumerate(flat) if v > 1]
        rows[0] += len(flat)
        rows[1] += len(flagged)
        best = max(best, max(flat))
        if first < 0 and flagged:
            first = flagged[0]
        for i in flagged:
            samples[i // per] += 1
    return rows, best, first, samples


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("shape", [(3, 4, 5), (12, 5), (15,)])
def test_record_check_matches_a_plain_count(compiled: bool, shape: tuple[int, ...]) -> None:
    """``record_check``'s per-sample reductions give the state a plain count gives: rows checked
    and flagged, the largest score, the first flagged row of the first pass that flagged one
    (later passes keep it), per-sample flags; in every score layout (B, H, T), (B*H, T), (B*T,),
    eagerly and compiled."""
    from fxsdc import runtime
    from passes.insert_checks import state_buffers
    batch, checks = 3, 2
    state = state_buffers(checks, batch)
    record = runtime.record_check
    if compiled:
        record = torch.compile(record, fullgraph=True, backend="inductor")
    gen = torch.Generator().manual_seed(0)
    passes = [torch.zeros(shape, dtype=torch.float64)]  # a clean pass first: nothing recorded
    for _ in range(3):
        score = torch.rand(shape, generator=gen, dtype=torch.float64) * 1.2
        score[torch.rand(shape, generator=gen) < 0.05] = float("inf")
        passes.append(score)
    passes[1].reshape(batch, -1)[0] = 0.5  # the first flagged row lies beyond sample 0
    batch_ref = torch.zeros(batch, 7, dtype=torch.long)
    for score in passes:
        record(score, 1, batch_ref, state["rows"], state["max"], state["first"], state["samples"])
    rows, best, first, samples = _record_reference(passes, batch)
    assert state["rows"][1].tolist() == rows and state["rows"][0].tolist() == [0, 0]
    assert state["max"][1].item() == best
    assert state["first"][1].item() == first and state["first"][0].item() == -1
    assert state["samples"][1].tolist() == samples
