"""Eager checks over attention-sized tensors run on slices of the leading dims
(``checks.sliced_when_eager``): the same scores bitwise, and no temporary larger than a slice."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fxsdc import checks, runtime
from fxsdc.bounds import lambertw_table

B, H, T, D = 3, 4, 32, 8  # the blocked sums split rows of 32 into 16 partials of 2, unpadded


def attention(dtype: torch.dtype, heads_first: bool = True) -> dict[str, torch.Tensor]:
    """One causal attention with a padded first sample; ``heads_first=False`` gives OPT's
    3-d layout, (B*H, T, .)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, generator=gen).to(dtype) for _ in range(3))
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    logits = torch.where(causal, (q @ k.transpose(-1, -2)) / 8, torch.finfo(dtype).min)
    weights = torch.softmax(logits.float(), -1).to(dtype)
    out = weights @ v
    mask = torch.ones(B, 1, 1, T, dtype=torch.bool)
    mask[0, ..., :5] = False
    parts = {"q": q, "k_t": k.transpose(-1, -2), "v": v, "logits": logits, "weights": weights,
             "out": out, "mask": mask}
    if not heads_first:
        parts = {name: t.reshape(B * H, *t.shape[2:]) if t.shape[1] == H else t
                 for name, t in parts.items() if name != "mask"}
    return parts


def check_calls(a: dict[str, torch.Tensor]) -> list:
    table = lambertw_table(T)
    calls = [
        (checks.softmax_sum_score, (a["weights"], a["logits"]), {}),
        (checks.softmax_bounds_score, (a["logits"], a["weights"], table), {}),
        (checks.matmul_checksum_score, (a["weights"], a["v"], a["out"]), {}),
        (runtime.scores_checksum_score, (a["q"], a["k_t"], a["logits"], torch.tensor(8.0), True),
         {}),
        (runtime.qo_bounds_score, (a["logits"], a["weights"], a["q"], a["out"], a["v"], table,
                                   8.0, True), {}),
    ]
    if "mask" in a:
        calls += [(checks.softmax_sum_score, (a["weights"], a["logits"], a["mask"]), {}),
                  (checks.softmax_bounds_score, (a["logits"], a["weights"], table),
                   {"mask": a["mask"]})]
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads_first", [True, False])
@pytest.mark.parametrize("limit", [1, T * T, 3 * T * T, 5 * T * T + 7, H * T * T + 1])
def test_slices_give_the_same_scores(monkeypatch, dtype, heads_first, limit) -> None:
    """Slices of one row, of some heads, of whole samples and ragged ones: bitwise the scores of
    the whole call."""
    a = attention(dtype, heads_first)
    for fn, args, kwargs in check_calls(a):
        monkeypatch.setattr(checks, "EAGER_SLICE_ELEMENTS", 1 << 40)
        whole = fn(*args, **kwargs)
        monkeypatch.setattr(checks, "EAGER_SLICE_ELEMENTS", limit)
        sliced = fn(*args, **kwargs)
        assert sliced.shape == whole.shape, fn.__name__
        assert torch.equal(sliced, whole), fn.__name__


class LargestOutput(TorchDispatchMode):
    """The most elements any op's freshly allocated output holds (views of an input, such as the
    slices themselves, are not temporaries)."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr()
                  for t in (*args, *(kwargs or {}).values()) if isinstance(t, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.numel = max(self.numel, t.numel())
        return out


def test_no_temporary_outgrows_a_slice(monkeypatch) -> None:
    """With slices of one head's rows (T * T elements), no op of any check makes a tensor larger
    than that; whole, the same checks make attention-sized ones (what the slices avoid)."""
    a = attention(torch.bfloat16)
    for limit, expect_at_most in ((1 << 40, None), (T * T, T * T)):
        monkeypatch.setattr(checks, "EAGER_SLICE_ELEMENTS", limit)
        for fn, args, kwargs in check_calls(a):
            with LargestOutput() as seen:
                fn(*args, **kwargs)
            if expect_at_most is None:
                assert seen.numel >= B * H * T * T, fn.__name__
            else:
                assert seen.numel <= expect_at_most, (fn.__name__, seen.numel)


def test_compiled_checks_run_whole(monkeypatch) -> None:
    """Under torch.compile the slicing is skipped: one graph without slices or concatenation,
    and the scores of the eager slices."""
    a = attention(torch.float32)
    monkeypatch.setattr(checks, "EAGER_SLICE_ELEMENTS", T * T)
    eager = checks.softmax_sum_score(a["weights"], a["logits"])
    graphs: list[torch.fx.GraphModule] = []

    def keep(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    result = torch.compile(checks.softmax_sum_score, fullgraph=True, backend=keep)(
        a["weights"], a["logits"])
    torch._dynamo.reset()
    assert len(graphs) == 1
    targets = {getattr(n.target, "__name__", str(n.target)) for n in graphs[0].graph.nodes}
    assert not targets & {"cat", "narrow"}, targets
    assert torch.equal(result, eager)
