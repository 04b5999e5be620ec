"""Host-side bounds: agreement with an independent float64 reference, masks, the inequality chain."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import lambertw
from transformers.pytorch_utils import Conv1D

from fxsdc.bounds import (
    compute_attention_bounds, compute_injected_epsilon, compute_injected_epsilon_from_p,
    detect_violation, force_kv_equal, force_kv_equal_fused, lambertw_table,
)

FIELDS = ["a_star", "w_star", "gamma", "epsilon", "lower1", "middle", "upper1", "upper2", "upper"]


def reference_row(a: np.ndarray, valid: np.ndarray) -> dict[str, float] | None:
    """The DESIGN section 3 quantities for one row, straight from the definitions (float64 loops)."""
    vals = [float(x) for x, ok in zip(a, valid) if ok]
    n = len(vals)
    if n < 2:
        return None
    a_star = max(vals)
    exps = [math.exp(x - a_star) for x in vals]
    total = sum(exps)
    w = [e / total for e in exps]
    second = sorted(vals)[-2]
    g = a_star - second
    w_n = lambertw((n - 1) / math.e).real
    if g < 1 + w_n:
        tau = w_n
    else:
        tau = (n - 1) * g * math.exp(-g) / (1 + (n - 1) * math.exp(-g))
    upper1 = a_star - sum(vals) / n
    return {
        "a_star": a_star, "w_star": max(w), "gamma": g,
        "epsilon": a_star - sum(wi * x for wi, x in zip(w, vals)),
        "lower1": g / (1 + math.exp(g)), "middle": g * (1 - max(w)),
        "upper1": upper1, "upper2": tau, "upper": min(upper1, tau),
    }


def masked_softmax(a: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits as a model masks them with finfo.min, torch.softmax of them) in float64."""
    logits = torch.where(valid, a, torch.finfo(a.dtype).min)
    return logits, torch.softmax(logits, -1)


def adversarial_rows(length: int, scale: float, rng: np.random.Generator) -> np.ndarray:
    """Rows that sit on or near each bound of the chain."""
    w_n = float(lambertw((length - 1) / math.e).real)
    rows = [
        np.r_[scale, np.full(length - 1, scale - (1 + w_n))],  # eps = tau at the switch point
        np.r_[scale, np.full(length - 1, scale - (1 + w_n) - 3)],  # tail branch, eps = tau
        np.r_[scale, np.full(length - 1, scale - 0.3)],  # eps = middle (all others equal)
        np.full(length, scale),  # all tied: gamma = 0, eps = 0
        np.r_[scale, scale, rng.normal(size=length - 2) - 40],  # two maxima
        rng.normal(size=length) * scale,
        np.clip(rng.standard_cauchy(length) * scale, -50, 50),
    ]
    return np.stack(rows)


@settings(max_examples=60, deadline=None)
@given(length=st.integers(2, 80), scale=st.sampled_from([0.0, 0.1, 1.0, 10.0, 50.0]),
       mask=st.sampled_from(["none", "causal", "padding"]), seed=st.integers(0, 2**32 - 1))
def test_library_matches_independent_reference_and_chain_holds(length: int, scale: float,
                                                                mask: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    a_np = adversarial_rows(length, scale, rng)
    rows = a_np.shape[0]
    if mask == "causal":
        valid_np = np.tril(np.ones((rows, length), bool), k=length - rows)
    elif mask == "padding":
        valid_np = np.arange(length)[None, :] < rng.integers(1, length + 1, size=(rows, 1))
    else:
        valid_np = np.ones((rows, length), bool)
    logits, p = masked_softmax(torch.from_numpy(a_np), torch.from_numpy(valid_np))
    res = compute_attention_bounds(logits, p)
    for i in range(rows):
        ref = reference_row(a_np[i], valid_np[i])
        assert bool(res.valid_mask[i]) == (ref is not None)
        assert int(res.n[i]) == int(valid_np[i].sum())
        if ref is None:
            assert math.isnan(float(res.upper[i])) and math.isnan(float(res.middle[i]))
            continue
        for name in FIELDS:
            got, want = float(getattr(res, name)[i]), ref[name]
            assert got == pytest.approx(want, rel=1e-9, abs=1e-9), (name, i)
        # the chain, within the float64 rounding allowance of the computed softmax
        tol = float(res.tolerance[i])
        assert 0 < tol < 1e-9
        assert ref["lower1"] <= ref["middle"] + 1e-12
        assert float(res.lower[i]) <= float(res.epsilon[i]) + tol
        assert float(res.epsilon[i]) <= float(res.upper[i]) + tol
    flags = detect_violation(res, compute_injected_epsilon_from_p(logits, p))
    assert not flags["comb"].any()


@settings(max_examples=40, deadline=None)
@given(dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       length=st.integers(2, 64), scale=st.sampled_from([1.0, 10.0, 50.0]),
       seed=st.integers(0, 2**32 - 1))
def test_model_dtype_rows_stay_within_tolerance(dtype: torch.dtype, length: int, scale: float,
                                                seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = torch.from_numpy(adversarial_rows(length, scale, rng)).to(dtype)
    valid = torch.ones(a.shape, dtype=torch.bool).tril(diagonal=length - a.shape[0])
    logits = torch.where(valid, a, torch.finfo(dtype).min)
    p = torch.softmax(logits, -1)
    res = compute_attention_bounds(logits, p, d=64)
    flags = detect_violation(res, compute_injected_epsilon_from_p(logits, p, d=64))
    assert not flags["s@w"].any(), res.to_dict()


def test_masked_keys_are_excluded_like_a_shorter_row() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(1, 10, generator=gen, dtype=torch.float64) * 4
    keep = torch.tensor([[True] * 6 + [False] * 4])
    full = compute_attention_bounds(*masked_softmax(a, keep))
    short = compute_attention_bounds(a[:, :6], torch.softmax(a[:, :6], -1))
    for name in FIELDS + ["n"]:
        torch.testing.assert_close(getattr(full, name), getattr(short, name))
    # additive masks (BERT), -inf masks and an explicit mask argument give the same bounds
    additive = a + (~keep).to(a.dtype) * torch.finfo(a.dtype).min
    neginf = a.masked_fill(~keep, -math.inf)
    for logits, mask in [(additive, None), (neginf, None), (a, keep)]:
        res = compute_attention_bounds(logits, torch.softmax(a.masked_fill(~keep, -math.inf), -1),
                                       mask=mask)
        torch.testing.assert_close(res.upper, full.upper)
        torch.testing.assert_close(res.epsilon, full.epsilon)


def test_short_and_nonfinite_rows_are_reported_not_zeroed() -> None:
    a = torch.randn(4, 5, dtype=torch.float64)
    a[1, 1:] = -math.inf  # n = 1
    a[2, 2] = math.nan
    p = torch.softmax(a, -1)
    p[3, 0] = math.inf
    res = compute_attention_bounds(a, p)
    assert res.valid_mask.tolist() == [True, False, False, False]
    assert res.nonfinite.tolist() == [False, False, True, True]
    assert res.n.tolist() == [5, 1, 4, 5]  # NaN is not a valid key; +Inf weights do not mask
    for name in ["lower1", "middle", "upper", "gamma"]:
        assert torch.isnan(getattr(res, name)[1:]).all()
    assert torch.isnan(res.epsilon[2])
    flags = detect_violation(res, compute_injected_epsilon_from_p(a, p))
    assert flags["s@w"].tolist() == [False, False, True, True]


def test_sqrt_d_scaling() -> None:
    a = torch.randn(3, 7, dtype=torch.float64)
    p = torch.softmax(a, -1)
    plain, scaled = compute_attention_bounds(a, p), compute_attention_bounds(a, p, d=16)
    for name in ["epsilon", "lower1", "middle", "upper1", "upper2", "upper", "tolerance"]:
        torch.testing.assert_close(getattr(scaled, name), 4 * getattr(plain, name))
    torch.testing.assert_close(scaled.gamma, plain.gamma)
    torch.testing.assert_close(compute_injected_epsilon_from_p(a, p, d=16), 4 * plain.epsilon)


def test_qo_path_equals_sw_path_when_k_equals_v() -> None:
    gen = torch.Generator().manual_seed(1)
    h, t = 16, 9
    q = torch.randn(2, 3, t, h, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 3, t, h, generator=gen, dtype=torch.float64)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    logits = torch.where(causal, q @ k.transpose(-1, -2) / math.sqrt(h), torch.finfo(torch.float64).min)
    p = torch.softmax(logits, -1)
    eps_sw = compute_injected_epsilon_from_p(logits, p, d=h)
    eps_qo = compute_injected_epsilon(q, p @ k, logits, d=h)  # V = K
    torch.testing.assert_close(eps_qo, eps_sw)
    assert not detect_violation(compute_attention_bounds(logits, p, d=h), eps_sw, eps_qo)["comb"].any()
    # seed form: sqrt(d) eps = q.k_{j*} - q.o
    j_star = logits.argmax(-1, keepdim=True)
    k_star = torch.take_along_dim(k, j_star, dim=-2)  # k_star[..., i, :] = k[..., j*(i), :]
    torch.testing.assert_close(eps_qo, (q * k_star).sum(-1) - (q * (p @ k)).sum(-1))
    # with V != K the two paths disagree
    v = torch.randn(2, 3, t, h, generator=gen, dtype=torch.float64)
    assert not torch.allclose(compute_injected_epsilon(q, p @ v, logits, d=h), eps_sw)


def test_detect_violation_flags_corrupted_weights() -> None:
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(6, 12, generator=gen) * 3
    p = torch.softmax(a, -1)
    clean = compute_attention_bounds(a, p)
    bad = p.clone()
    bad[4, 5] = bad[4, 5] * 2.0**100  # what a bit-30 flip does to a weight
    flags = detect_violation(clean, compute_injected_epsilon_from_p(a, bad),
                             eps_qo=compute_injected_epsilon_from_p(a, p))
    assert flags["s@w"].tolist() == [i == 4 for i in range(6)]
    assert not flags["q@o"].any()
    assert torch.equal(flags["comb"], flags["s@w"] | flags["q@o"])
    assert flags["margin_s@w"][4] > 0 and (flags["margin_s@w"][:4] <= clean.tolerance[:4]).all()


def test_lambertw_table() -> None:
    table = lambertw_table(50)
    assert table.dtype == torch.float64 and table.shape == (51,)
    assert table[0] == 0 and table[1] == 0
    n = torch.arange(2, 51, dtype=torch.float64)
    torch.testing.assert_close(table[2:] * torch.exp(table[2:]), (n - 1) / math.e)


def test_force_kv_equal() -> None:
    torch.manual_seed(0)
    k_proj, v_proj = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    assert force_kv_equal([(k_proj, v_proj)]) == 1
    assert torch.equal(k_proj.weight, v_proj.weight) and torch.equal(k_proj.bias, v_proj.bias)

    c_attn = Conv1D(3 * 8, 8)  # GPT-2: weight [in, 3 * embed], outputs q | k | v
    torch.nn.init.normal_(c_attn.weight)
    torch.nn.init.normal_(c_attn.bias)
    q_before = c_attn.weight[:, :8].clone()
    force_kv_equal_fused(c_attn, embed_dim=8, out_dim=1)
    assert torch.equal(c_attn.weight[:, 16:], c_attn.weight[:, 8:16])
    assert torch.equal(c_attn.bias[16:], c_attn.bias[8:16])
    assert torch.equal(c_attn.weight[:, :8], q_before)
    x = torch.randn(2, 8)
    _, k_out, v_out = c_attn(x).split(8, dim=-1)
    torch.testing.assert_close(k_out, v_out)
