"""Host side of the online detector: reset its device state and read it once per step."""
from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from passes.insert_checks import STATE_PREFIX, CheckInfo, state_buffers


@dataclass(frozen=True)
class CheckReading:
    """What one check saw since the last reset."""

    info: CheckInfo
    rows: int
    flagged: int
    max_score: float  # largest violation / tolerance (> 1 means flagged)
    first_row: int  # flat index of the first flagged row, -1 if none
    per_sample: tuple[int, ...]  # flagged rows per sample of the last batch size

    def to_dict(self) -> dict:
        return {**self.info.to_dict(), "rows": self.rows, "flagged": self.flagged,
                "max_score": self.max_score, "first_row": self.first_row,
                "per_sample": list(self.per_sample)}


class Detector:
    """Reads and resets the ``fxsdc_check_*`` buffers of an instrumented GraphModule."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.checks: list[CheckInfo] = gm.meta.get("fxsdc_checks", [])
        self._batch = getattr(gm, STATE_PREFIX + "samples").shape[1] if self.checks else 0

    def reset(self, batch_size: int | None = None) -> None:
        """Zero the state, in place (a compiled module keeps its graph); a batch larger than the
        state holds gets new buffers (one recompilation)."""
        if not self.checks:
            return
        self._batch = batch_size or self._batch
        current = getattr(self.gm, STATE_PREFIX + "samples")
        fresh = state_buffers(len(self.checks), max(self._batch, current.shape[1]),
                              current.device)
        for name, value in fresh.items():
            buf = getattr(self.gm, STATE_PREFIX + name)
            if buf.shape == value.shape:
                buf.copy_(value)
            else:
                self.gm.register_buffer(STATE_PREFIX + name, value)

    def read(self) -> list[CheckReading]:
        """One reading per check (one device-to-host copy per buffer)."""
        if not self.checks:
            return []
        rows = getattr(self.gm, STATE_PREFIX + "rows").cpu().tolist()
        best = getattr(self.gm, STATE_PREFIX + "max").cpu().tolist()
        first = getattr(self.gm, STATE_PREFIX + "first").cpu().tolist()
        samples = getattr(self.gm, STATE_PREFIX + "samples")[:, : self._batch].cpu().tolist()
        return [CheckReading(info, r[0], r[1], m, f, tuple(s))
                for info, r, m, f, s in zip(self.checks, rows, best, first, samples)]

    def flagged_samples(self) -> dict[str, list[bool]]:
        """Per check name (bounds, softmax, abft, bounds-qo): which samples of the batch any of its
        nodes flagged — one verdict per trial when each sample carries one fault. With both
        bounds paths, "comb" is the seed's combination: either flagged."""
        verdicts: dict[str, list[bool]] = {}
        for reading in self.read():
            per = verdicts.setdefault(reading.info.check, [False] * self._batch)
            for b, count in enumerate(reading.per_sample):
                per[b] = per[b] or count > 0
        if "bounds" in verdicts and "bounds-qo" in verdicts:
            verdicts["comb"] = [a or b for a, b in zip(verdicts["bounds"], verdicts["bounds-qo"])]
        return verdicts

    def total_flagged(self) -> int:
        return sum(r.flagged for r in self.read())
