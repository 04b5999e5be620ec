"""Shared fixtures: tiny models are built once per session (they are deterministic)."""
from __future__ import annotations

import functools

import pytest

from fxsdc.pipeline import Instrumented, instrument

TINY_MODELS = ("gpt2", "distilbert-base-uncased", "bert-base-uncased", "facebook/opt-125m",
               "TinyLlama/TinyLlama-1.1B-Chat-v1.0")


@functools.lru_cache(maxsize=None)
def tiny_instrumented(name: str, **kwargs) -> Instrumented:
    """An instrumented tiny model, shared between tests: tests must leave its faults cleared."""
    return instrument(name, tiny=True, **kwargs)


@pytest.fixture(params=TINY_MODELS, ids=lambda n: n.split("/")[-1])
def tiny_model(request) -> Instrumented:
    result = tiny_instrumented(request.param)
    yield result
    result.faults.clear()
