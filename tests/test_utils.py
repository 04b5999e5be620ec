"""Seed utilities: logging switches, NaN check, bound diagnostics, top-2."""
from __future__ import annotations

import logging
import math

import pytest
import torch

from fxsdc.bounds import compute_attention_bounds
from fxsdc.utils import check_nan, enable_debug, enable_log_file, hist_tensor_diff, logger, top2


@pytest.fixture
def clean_logger():
    handlers, level = list(logger.handlers), logger.level
    yield logger
    for h in logger.handlers:
        if h not in handlers:
            logger.removeHandler(h)
            h.close()
    logger.setLevel(level)


def test_enable_debug_and_log_file(clean_logger, tmp_path) -> None:
    enable_debug(True)
    assert logger.level == logging.DEBUG
    path = tmp_path / "logs" / "fxsdc.log"
    handler = enable_log_file(path)
    assert enable_log_file(path) is handler  # no duplicate handler
    logger.debug("hello %d", 42)
    handler.flush()
    assert "hello 42" in path.read_text()
    enable_debug(False)
    assert logger.level == logging.WARNING


def test_check_nan(clean_logger, caplog) -> None:
    assert not check_nan(torch.ones(3), "ok")
    t = torch.tensor([1.0, math.nan, math.inf, -math.inf, math.nan])
    with caplog.at_level(logging.WARNING, logger="fxsdc"):
        assert check_nan(t, "scores")
    assert "scores: 2 NaN, 1 +Inf, 1 -Inf of 5 values" in caplog.text
    assert not check_nan(torch.arange(3), "ints")


def test_hist_tensor_diff_on_bounds(clean_logger, caplog) -> None:
    a = torch.randn(40, 16, dtype=torch.float64) * 3
    a[0, 1:] = -math.inf  # n = 1: excluded
    res = compute_attention_bounds(a, torch.softmax(a, -1))
    with caplog.at_level(logging.INFO, logger="fxsdc"):
        summary = hist_tensor_diff(res.to_dict(), bins=5)
    assert set(summary) == {"epsilon", "gap", "margin_lower", "margin_upper"}
    for s in summary.values():
        assert s["count"] == 39 and sum(s["hist"]) == 39 and len(s["hist"]) == 5
    assert summary["margin_lower"]["negative"] == 0 and summary["margin_upper"]["min"] >= -1e-12
    assert summary["gap"]["min"] >= 0
    assert "margin_upper: n=39" in caplog.text


def test_top2_masked_and_short() -> None:
    x = torch.tensor([[1.0, 5.0, 3.0, 5.0], [4.0, 2.0, 9.0, 7.0]])
    values, indices = top2(x)
    assert values.tolist() == [[5.0, 5.0], [9.0, 7.0]]
    assert sorted(indices[0].tolist()) == [1, 3]
    mask = torch.tensor([[True, False, True, False], [True, True, False, False]])
    values, indices = top2(x, mask=mask)
    assert values.tolist() == [[3.0, 1.0], [4.0, 2.0]] and indices.tolist() == [[2, 0], [0, 1]]
    values, indices = top2(torch.tensor([[2.0]]))
    assert values.tolist() == [[2.0, -math.inf]] and indices.tolist() == [[0, -1]]
