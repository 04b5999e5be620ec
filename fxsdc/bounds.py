"""Host-side attention bounds (the seed's ``bounds_computation`` API), mask-aware.

For one query row: logits ``a`` (the tensor entering softmax: scaled and masked), valid keys V,
n = |V|, w = softmax(a), a* = max_V a, gamma = a* - second max_V a, w* = max_V w and the
deviation eps = a* - sum_V w_j a_j. A valid softmax row satisfies (DESIGN section 3)

    lower1 = gamma/(1+e^gamma) <= middle = gamma(1-w*) <= eps <= upper = min(upper1, upper2),
    upper1 = a* - mean_V a,      upper2 = tau(gamma, n) = W((n-1)/e)   if gamma < 1 + W((n-1)/e)
                                                     = (n-1) gamma e^-gamma / (1 + (n-1) e^-gamma)

Masked keys - ``mask`` False, or logits that are -inf or <= finfo(dtype).min / 2 (additive and
``where`` masks use finfo.min) - are left out of a*, the second max, the mean, the sum and n.
The arithmetic is shared with the runtime check (``fxsdc.checks.softmax_row_stats``) and done in
float64. Rows with n < 2 are not checkable; rows whose logits hold NaN/+Inf or whose weights hold
NaN/Inf are reported in ``nonfinite``. Both have ``valid_mask`` False, and their bound fields are
NaN (never zero); ``epsilon`` keeps whatever the inputs give (NaN for NaN inputs, 0 for n = 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Iterable

import numpy as np
import torch
from scipy.special import lambertw
from torch import nn

from fxsdc.checks import (CHECK_DTYPE, nan_or_posinf, not_finite, softmax_bounds_tolerance,
                          softmax_row_stats, valid_keys)


def lambertw_table(n_max: int) -> torch.Tensor:
    """float64 tensor of length ``n_max + 1``; entry n = W((n-1)/e) (principal branch), 0 for n <= 1.

    W((n-1)/e) depends only on n, so a pass computes this once and keeps it as a buffer; the
    runtime check indexes it with each row's n.
    """
    n = np.arange(n_max + 1, dtype=np.float64)
    w = lambertw(np.maximum(n - 1, 0) / math.e).real
    return torch.from_numpy(np.ascontiguousarray(w))


@dataclass
class BoundsResult:
    """Per-row bounds; every field has the shape of ``scores.shape[:-1]``.

    a_star:    max_V a                        (logit units, never scaled by sqrt(d))
    w_star:    max_V w
    gamma:     a* - second max_V a, the margin (logit units)
    epsilon:   a* - sum_V w_j a_j             ("s@w" deviation of the given p)
    lower1:    gamma / (1 + e^gamma)          (weakest lower bound)
    middle:    gamma (1 - w*)                 (tighter lower bound)
    upper1:    a* - mean_V a                  (mean bound)
    upper2:    tau(gamma, n)                  (Lambert-W bound)
    upper:     min(upper1, upper2)
    lower:     max(lower1, middle)            (what detect_violation tests)
    tolerance: rounding allowance on ``lower <= eps <= upper`` for p as computed in its dtype
               (``fxsdc.checks.softmax_bounds_tolerance``)
    n:         number of valid keys
    nonfinite: NaN/+Inf logits or NaN/Inf weights in the row
    valid_mask: n >= 2 and not nonfinite (bound fields are NaN elsewhere)

    When ``compute_attention_bounds`` got ``d``, epsilon, lower1, middle, upper1, upper2, upper,
    lower and tolerance are multiplied by sqrt(d) (the seed's unscaled units, q.k instead of
    q.k/sqrt(d)); a_star and gamma stay in logit units because tau is a function of them.
    """

    a_star: torch.Tensor
    w_star: torch.Tensor
    gamma: torch.Tensor
    epsilon: torch.Tensor
    lower1: torch.Tensor
    middle: torch.Tensor
    upper1: torch.Tensor
    upper2: torch.Tensor
    upper: torch.Tensor
    lower: torch.Tensor
    tolerance: torch.Tensor
    n: torch.Tensor
    nonfinite: torch.Tensor
    valid_mask: torch.Tensor

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _unit(d: int | float | None) -> float:
    return 1.0 if d is None else math.sqrt(d)


def compute_attention_bounds(scores: torch.Tensor, p: torch.Tensor, d: int | float | None = None,
                             mask: torch.Tensor | None = None) -> BoundsResult:
    """Bounds for every row of ``scores`` (the logits entering softmax) and ``p`` = softmax(scores).

    Last dim = keys. ``mask`` (optional, True = valid key, broadcastable) adds to the
    finfo.min/-inf rule. ``d``: multiply eps and the bound fields by sqrt(d) (see BoundsResult).
    """
    stats = softmax_row_stats(scores, p, lambertw_table(scores.shape[-1]).to(scores.device), mask)
    tolerance = softmax_bounds_tolerance(stats, p.dtype, scores.shape[-1])
    # The runtime statistics see NaN logits only through the weights (a softmax row with a NaN
    # input is NaN throughout); here p need not be softmax(scores), so every element is tested.
    nonfinite = stats["nonfinite"] | nan_or_posinf(scores).any(-1) | not_finite(p).any(-1)
    valid = stats["checkable"] & ~nonfinite
    unit = _unit(d)
    nan = torch.full((), math.nan, dtype=CHECK_DTYPE, device=valid.device)

    def bound(x: torch.Tensor) -> torch.Tensor:
        return torch.where(valid, x, nan)

    lower = torch.maximum(stats["lower1"], stats["middle"])
    upper = torch.minimum(stats["upper1"], stats["upper2"])
    return BoundsResult(
        a_star=stats["a_star"], w_star=stats["w_star"], gamma=bound(stats["gamma"]),
        epsilon=stats["epsilon"] * unit,
        lower1=bound(stats["lower1"]) * unit, middle=bound(stats["middle"]) * unit,
        upper1=bound(stats["upper1"]) * unit, upper2=bound(stats["upper2"]) * unit,
        upper=bound(upper) * unit, lower=bound(lower) * unit,
        tolerance=bound(tolerance) * unit,
        n=stats["n"], nonfinite=nonfinite, valid_mask=valid,
    )


def _valid_and_max(scores: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    valid = valid_keys(scores, mask)
    a = scores.to(CHECK_DTYPE)
    a_star = torch.where(valid, a, torch.full((), -math.inf, dtype=CHECK_DTYPE,
                                              device=a.device)).amax(-1)
    return valid, a_star


def compute_injected_epsilon_from_p(scores: torch.Tensor, p: torch.Tensor,
                                    mask: torch.Tensor | None = None,
                                    d: int | float | None = None) -> torch.Tensor:
    """"s@w" deviation eps = a* - sum_V p_j a_j in float64 (times sqrt(d) when d is given).

    ``p`` may be corrupted (that is the point); masked keys are left out as in the bounds.
    """
    valid, a_star = _valid_and_max(scores, mask)
    zero = torch.zeros((), dtype=CHECK_DTYPE, device=scores.device)
    weighted = torch.where(valid, scores.to(CHECK_DTYPE) * p.to(CHECK_DTYPE), zero).sum(-1)
    return (a_star - weighted) * _unit(d)


def compute_injected_epsilon(q: torch.Tensor, o: torch.Tensor, scores: torch.Tensor,
                             mask: torch.Tensor | None = None, d: int | float | None = None,
                             scale: float | None = None) -> torch.Tensor:
    """"q@o" deviation eps = a* - scale (q . o) per row, float64 (times sqrt(d) when d is given).

    ``q[..., n_q, h]``: the query rows, ``o[..., n_q, h]``: the head's attention output
    (sum_j p_j v_j, before heads merge), ``scores``: the logits, with
    logits = scale * q.k + mask (``scale`` defaults to 1/sqrt(h); OPT pre-scales q, pass 1.0).
    q . o = sum_j p_j q . v_j equals sum_j p_j a_j / scale only when **K = V** (see
    ``force_kv_equal``) and no additive bias (ALiBi, relative positions) enters the logits; masked
    keys must have p_j = 0 (finfo.min masks do). Otherwise this is not the softmax deviation.
    """
    _, a_star = _valid_and_max(scores, mask)
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qo = (q.to(CHECK_DTYPE) * o.to(CHECK_DTYPE)).sum(-1)
    return (a_star - s * qo) * _unit(d)


@torch.no_grad()
def force_kv_equal(pairs: Iterable[tuple[nn.Module, nn.Module]]) -> int:
    """Copy each K projection's ``weight`` (and ``bias``) into its V projection, in place.

    ``pairs``: (k_proj, v_proj) modules with same-shaped parameters (nn.Linear, GPT-2 Conv1D
    when K and V are separate modules). Makes V = K so that the "q@o" path measures the softmax
    deviation (the seed's ``force_kv_equal`` option). Returns the number of pairs changed. For a
    fused QKV projection use ``force_kv_equal_fused``.
    """
    count = 0
    for k_proj, v_proj in pairs:
        v_proj.weight.copy_(k_proj.weight)
        if getattr(k_proj, "bias", None) is not None:
            v_proj.bias.copy_(k_proj.bias)
        count += 1
    return count


@torch.no_grad()
def force_kv_equal_fused(qkv: nn.Module, embed_dim: int, out_dim: int) -> None:
    """V = K inside a fused [q | k | v] projection (GPT-2's ``c_attn``), in place.

    ``out_dim``: the weight dimension that holds the 3 * embed_dim outputs (1 for GPT-2's Conv1D,
    whose weight is [in, out]; 0 for nn.Linear). The bias is always [3 * embed_dim].
    """
    weight = qkv.weight
    weight.narrow(out_dim, 2 * embed_dim, embed_dim).copy_(weight.narrow(out_dim, embed_dim, embed_dim))
    if getattr(qkv, "bias", None) is not None:
        qkv.bias[2 * embed_dim:3 * embed_dim].copy_(qkv.bias[embed_dim:2 * embed_dim])


def detect_violation(bounds: BoundsResult, eps_sw: torch.Tensor,
                     eps_qo: torch.Tensor | None = None,
                     tolerance: float | torch.Tensor | None = None,
                     tolerance_qo: float | torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-row violation flags of ``bounds.lower - tol <= eps <= bounds.upper + tol``.

    ``eps_sw``/``eps_qo`` in the same units as ``bounds`` (pass the same ``d``). ``tolerance``
    defaults to ``bounds.tolerance``, the rounding allowance of the s@w deviation for p in its
    dtype; ``tolerance_qo`` defaults to ``tolerance`` - enough for float64 runs only, because
    the q@o path also carries the rounding of o and of q.o: pass a larger one for float32/bf16.
    Returns bool tensors ``"s@w"``, ``"q@o"`` (all False without eps_qo) and ``"comb"`` (either),
    plus ``"margin_s@w"``/``"margin_q@o"`` = max(lower - eps, eps - upper) (> 0: outside the
    bounds). A row is flagged when it is checkable and outside, or when its eps is NaN/Inf, or
    when the bounds' own inputs were non-finite (``bounds.nonfinite``); rows with n < 2 never are.
    """
    tol = bounds.tolerance if tolerance is None else tolerance
    tol_qo = tol if tolerance_qo is None else tolerance_qo

    def check(eps: torch.Tensor, t: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        eps = eps.to(CHECK_DTYPE)
        margin = torch.maximum(bounds.lower - eps, eps - bounds.upper)
        outside = bounds.valid_mask & (margin > t)
        checkable = bounds.valid_mask | bounds.nonfinite
        return outside | (checkable & ~torch.isfinite(eps)) | bounds.nonfinite, margin

    flags_sw, margin_sw = check(eps_sw, tol)
    if eps_qo is None:
        flags_qo, margin_qo = torch.zeros_like(flags_sw), torch.full_like(margin_sw, math.nan)
    else:
        flags_qo, margin_qo = check(eps_qo, tol_qo)
    return {"s@w": flags_sw, "q@o": flags_qo, "comb": flags_sw | flags_qo,
            "margin_s@w": margin_sw, "margin_q@o": margin_qo}
