"""No host synchronisation inside an instrumented forward pass (DESIGN section 5).

A host sync stalls the GPU pipeline and breaks ``torch.compile`` graphs, so the injection and check
nodes must never read a device value on the host. On a CPU-only machine nothing actually syncs,
so the tests look for the operations that *would* sync on a GPU:

- every aten op that reaches the dispatcher is recorded with a ``TorchDispatchMode``: scalar reads
  (``.item()``, ``float(t)``, ``bool(t)`` all end in ``aten._local_scalar_dense``), comparisons that
  return a Python bool (``aten.equal``, ``aten.is_nonzero``) and ops with data-dependent output
  shapes (``aten.nonzero``, ``aten.masked_select``, ``aten.unique*``, and indexing with a boolean
  mask, whose ``nonzero`` runs inside ``aten.index`` below the mode), which must read a count;
- device-to-host copies of a CPU tensor (``.tolist()``, ``.numpy()``, ``.cpu()``) never reach the
  dispatcher, so a ``sys.setprofile`` hook records calls of those tensor methods by name.

On a CUDA machine ``test_no_sync_cuda`` also runs the forward under
``torch.cuda.set_sync_debug_mode("error")``, which raises on any synchronising call.

The compiled test checks the other half of the contract: arming faults and resetting the detector
between passes only writes buffers in place, so one compiled graph serves them all
(``torch._dynamo.config.error_on_recompile``), and a compiled call reads no tensor on the host,
dynamo's guard functions included (the profile hook only: under the dispatch mode dynamo would
not run the compiled code). It is the only compile here (tiny model, ~30 s).
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

from fxsdc.faults import Fault
from fxsdc.pipeline import instrument

from .conftest import TINY_MODELS, tiny_instrumented

aten = torch.ops.aten
SYNC_OPS = {aten._local_scalar_dense, aten.item, aten.is_nonzero, aten.nonzero, aten.equal,
            aten.masked_select, aten._unique, aten._unique2, aten.unique_dim,
            aten.unique_consecutive}
MASK_INDEX_OPS = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
BOOL_MASK_INDEX = "aten.index (boolean mask)"
SYNC_OPS.add(BOOL_MASK_INDEX)
HOST_COPY_METHODS = {"item", "tolist", "numpy", "cpu"}
CHECKS = ["bounds", "softmax", "abft"]


class _RecordOps(TorchDispatchMode):
    """Records the overload packet of every aten op dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[Any] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        op = func.overloadpacket
        if op in MASK_INDEX_OPS and any(
                isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                for i in args[1]):
            op = BOOL_MASK_INDEX  # x[mask]: its nonzero runs below this mode
        self.ops.append(op)
        return func(*args, **(kwargs or {}))


@contextmanager
def record_host_copies():
    """Yield a list that, on exit, holds the host-copy tensor methods (``HOST_COPY_METHODS``)
    called from Python, dynamo's guard functions included. Unlike the dispatch mode of
    ``record_host_syncs``, this hook leaves a compiled module running its compiled code."""
    copies: list[str] = []

    def hook(frame, event, arg):
        if event == "c_call" and getattr(arg, "__name__", None) in HOST_COPY_METHODS and \
                isinstance(getattr(arg, "__self__", None), torch.Tensor):
            copies.append(f"Tensor.{arg.__name__} in {frame.f_code.co_name} "
                          f"({frame.f_code.co_filename}:{frame.f_lineno})")

    previous = sys.getprofile()
    sys.setprofile(hook)
    try:
        yield copies
    finally:
        sys.setprofile(previous)


@contextmanager
def record_host_syncs():
    """Yield a dict that, on exit, holds ``ops`` (every aten op seen), ``syncs`` (the sync ops
    among them, by name) and ``copies`` (host-copy tensor methods called from Python)."""
    found: dict[str, list] = {"ops": [], "syncs": [], "copies": []}
    mode = _RecordOps()
    with record_host_copies() as copies, mode:
        yield found
    found["ops"] = mode.ops
    found["syncs"] = sorted({str(op) for op in mode.ops if op in SYNC_OPS})
    found["copies"] = copies


def _tiny_all_checks(slots: int = 1):
    return instrument("gpt2", tiny=True, checks=CHECKS, slots=slots)


def _armed_fault() -> list[Fault]:
    # scores of layer 1, sample 0, head 2, query 7, key 3: bit 30 (float32 exponent MSB)
    return [Fault(1, "scores", (0, 2, 7, 3), (30,))]


# -- the recorder itself ------------------------------------------------------------------------
def test_recorder_catches_scalar_reads_and_host_copies():
    x = torch.arange(6.0)

    def syncs(fn: Callable[[], Any]) -> dict[str, list]:
        with record_host_syncs() as found:
            fn()
        return found

    assert syncs(lambda: x.sum().item())["syncs"] == ["aten._local_scalar_dense"]
    assert syncs(lambda: float(x.max()))["syncs"] == ["aten._local_scalar_dense"]
    assert syncs(lambda: bool((x > 2).any()))["syncs"] == ["aten._local_scalar_dense"]
    assert syncs(lambda: x.nonzero())["syncs"] == ["aten.nonzero"]
    assert syncs(lambda: torch.equal(x, x))["syncs"] == ["aten.equal"]
    assert syncs(lambda: x[x > 2])["syncs"] == [BOOL_MASK_INDEX]
    assert syncs(lambda: x.tolist())["copies"][0].startswith("Tensor.tolist")
    assert syncs(lambda: x.numpy())["copies"][0].startswith("Tensor.numpy")
    clean = syncs(lambda: torch.where(x > 2, x, 0.0).amax() * 2)
    assert clean["syncs"] == [] and clean["copies"] == [] and clean["ops"]


# -- the instrumented forward -------------------------------------------------------------------
def test_instrumented_forward_has_no_host_sync():
    result = _tiny_all_checks()
    x = result.example
    batch, seq = x["input_ids"].shape
    result.faults.set_faults(_armed_fault(), batch, seq)
    result.detector.reset(batch)
    with torch.no_grad(), record_host_syncs() as found:
        result.gm(**x)
    # Outside forward: the fault was applied and the checks ran (a real pass was recorded).
    applied = result.faults.applied()[0]
    assert applied["before"] == applied["before"] and applied["after"] != applied["before"]
    assert sum(r.rows for r in result.detector.read()) > 0
    names = {str(op) for op in found["ops"]}
    assert "aten.bitwise_xor" in names and "aten._softmax" in names  # injection and model ran
    assert found["syncs"] == [], f"host syncs inside forward: {found['syncs']}"
    assert found["copies"] == [], f"host copies inside forward: {found['copies']}"


@pytest.mark.parametrize("name", TINY_MODELS)
def test_instrumented_models_hold_no_zero_dim_buffers(name: str) -> None:
    """Dynamo makes a 0-dim floating buffer's value a symbolic float, and its guard then reads
    the value on the host in every compiled call (a device sync on GPUs): every buffer the
    passes add has at least one dimension."""
    result = tiny_instrumented(name, checks=tuple(CHECKS))
    assert [n for n, b in result.gm.named_buffers() if b.dim() == 0] == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (sync debug mode)")
def test_no_sync_cuda():
    result = _tiny_all_checks()
    result.gm.to("cuda")
    x = {k: v.cuda() for k, v in result.example.items()}
    batch, seq = x["input_ids"].shape
    result.faults.set_faults(_armed_fault(), batch, seq)
    result.detector.reset(batch)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            result.gm(**x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert sum(r.rows for r in result.detector.read()) > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (graph capture)")
@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_cuda_graph_capture_serves_a_sweep(mode: str):
    """The forward with all checks and a fault armed captures into one CUDA graph (capture
    fails on any host sync), and replaying that graph after arming a different fault and
    resetting the detector reproduces each trial's un-captured run: what varies between trials
    lives in device buffers that the graph reads."""
    result = _tiny_all_checks()
    result.gm.to("cuda")
    x = {k: v.cuda() for k, v in result.example.items()}
    batch, seq = x["input_ids"].shape
    forward = torch.compile(result.gm, fullgraph=True) if mode == "compiled" else result.gm
    trials = [_armed_fault(), [Fault(0, "q", (2, 1, 5, 3), (30,))], []]

    def arm(faults: list[Fault]) -> None:
        result.faults.set_faults(faults, batch, seq)
        result.detector.reset(batch)

    expected = []
    with torch.no_grad():
        for faults in trials:
            arm(faults)
            logits = forward(**x)["logits"].clone()
            expected.append((logits, result.faults.applied(),
                             [(r.rows, r.flagged) for r in result.detector.read()]))
        arm(trials[0])
        side = torch.cuda.Stream()  # warm up off the capture stream, as torch.cuda.graph asks
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            forward(**x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = forward(**x)["logits"]
    for faults, (logits, applied, readings) in zip(trials, expected):
        arm(faults)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, logits)
        assert result.faults.applied() == applied
        assert [(r.rows, r.flagged) for r in result.detector.read()] == readings
    assert expected[0][2] != expected[2][2], "the armed fault was flagged, the clean pass not"
    result.faults.clear()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_instrument_a_model_already_on_cuda():
    """instrument() takes a model on the GPU: example, probes and new buffers follow it."""
    from fxsdc import models
    model = models.load_model("gpt2", tiny=True).model.cuda()
    result = instrument(model, checks=CHECKS)
    x = result.example
    assert x["input_ids"].is_cuda and all(b.is_cuda for b in result.gm.buffers())
    batch, seq = x["input_ids"].shape
    result.detector.reset(batch)
    with torch.no_grad():
        assert torch.equal(result.gm(**x)["logits"], result.original(**x)["logits"])
        assert result.detector.total_flagged() == 0
        result.faults.set_faults(_armed_fault(), batch, seq)
        result.gm(**x)
    assert result.detector.total_flagged() > 0


# -- compiled: faults and detector resets do not recompile ---------------------------------------
@pytest.mark.slow
def test_compiled_does_not_recompile_on_fault_or_detector_changes(monkeypatch):
    torch._dynamo.reset()
    result = _tiny_all_checks(slots=3)
    x = result.example
    batch, seq = x["input_ids"].shape
    module = result.compile()
    result.detector.reset(batch)
    with torch.no_grad():
        module(**x)  # compiles
    frames = counters["stats"]["unique_graphs"]
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    tables = [_armed_fault(),
              [Fault(0, "weights", (1, 0, 12, 4), (30,)), Fault(1, "v", (2, 3, 5, 1), (31,))],
              [Fault(0, "q", (0, 1, 2, 3), (22, 30)), Fault(1, "out", (1, 2, 3, 4), (29,)),
               Fault(0, "k", (2, 0, 0, 0), (30,))],
              []]
    flagged = []
    for faults in tables:
        if faults:
            result.faults.set_faults(faults, batch, seq)
        else:
            result.faults.clear()
        result.detector.reset(batch)
        with torch.no_grad(), record_host_copies() as copies:
            module(**x)
        # dynamo's guards included: a 0-dim float buffer's value became a symbolic float, whose
        # guard read it with .item() in every call (the output projection's rounding ratio).
        assert copies == [], copies
        readings = result.detector.read()
        assert sum(r.rows for r in readings) > 0  # the compiled checks ran
        flagged.append(sum(r.flagged for r in readings))
    assert counters["stats"]["unique_graphs"] == frames
    assert flagged[-1] == 0  # faults cleared and state reset: a clean pass flags nothing
