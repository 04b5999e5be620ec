"""Golden graphs: the instrumented graph of each tiny model equals its checked-in text form.

A change here means the passes now do something different: read the diff, and if the new graph
is right, regenerate with ``python tools/regen_golden.py`` and say why in the commit.
"""
from __future__ import annotations

import difflib

import pytest

from .golden_cases import CASES, golden_path


@pytest.mark.parametrize("case", sorted(CASES))
def test_instrumented_graph_matches_golden(case):
    expected = golden_path(case).read_text()
    actual = CASES[case]()
    if actual != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(keepends=True),
                                            actual.splitlines(keepends=True),
                                            fromfile=f"golden/{case}.txt", tofile="actual"))
        pytest.fail(f"graph differs from golden/{case}.txt "
                    f"(regenerate with tools/regen_golden.py if intended):\n{diff}")
