#!/usr/bin/env python
"""Regenerate the golden graphs under tests/golden/ (all cases, or those named).

    python tools/regen_golden.py [CASE ...]

Review ``git diff tests/golden`` afterwards: every changed line is a change in what the passes do.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.golden_cases import CASES, GOLDEN_DIR, golden_path  # noqa: E402


def main(names: list[str]) -> int:
    unknown = [n for n in names if n not in CASES]
    if unknown:
        print(f"unknown case(s) {unknown}; known: {', '.join(sorted(CASES))}", file=sys.stderr)
        return 2
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    for name in names or sorted(CASES):
        text = CASES[name]()
        path = golden_path(name)
        changed = not path.exists() or path.read_text() != text
        path.write_text(text)
        print(f"{'updated' if changed else 'unchanged'}: {path.relative_to(GOLDEN_DIR.parent.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
