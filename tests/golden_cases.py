"""The golden-graph cases: what each checked-in file under tests/golden/ pins down.

Each case instruments a tiny model (deterministic: the graph does not depend on weights) and
renders the result in the normalized text form of :func:`passes.graph_view.normalized_text`.
``tools/regen_golden.py`` rewrites the files; ``tests/test_golden.py`` compares against them.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fxsdc.pipeline import instrument
from passes.graph_view import normalized_text

GOLDEN_DIR = Path(__file__).parent / "golden"


def _injected(model: str, **kwargs) -> Callable[[], str]:
    return lambda: normalized_text(instrument(model, tiny=True, **kwargs).gm)


CASES: dict[str, Callable[[], str]] = {
    "gpt2_inject_all": _injected("gpt2"),
    "distilbert_inject_all": _injected("distilbert-base-uncased"),
    "bert_inject_all": _injected("bert-base-uncased"),
    "opt_inject_all": _injected("facebook/opt-125m"),
    "llama_inject_all": _injected("TinyLlama/TinyLlama-1.1B-Chat-v1.0"),
    "gpt2_inject_scores_layer1_probabilistic": _injected(
        "gpt2", locations=["scores"], layers=[1], fault_model="probabilistic"),
    "gpt2_checks_layer1": _injected("gpt2", layers=[1], checks=["bounds", "softmax", "abft"]),
    "opt_checks_comb_layer0": _injected("facebook/opt-125m", layers=[0], locations=["weights"],
                                        checks=["comb", "abft"], force_kv_equal=True),
    "llama_checks_layer0": _injected("TinyLlama/TinyLlama-1.1B-Chat-v1.0", layers=[0],
                                     checks=["bounds", "softmax", "abft"]),
}


def golden_path(case: str) -> Path:
    return GOLDEN_DIR / f"{case}.txt"
