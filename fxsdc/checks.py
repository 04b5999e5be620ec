"""Runtime consistency checks called by the check nodes that the graph passes insert.

Every check is pure tensor code: no ``.item()``, no host copies, no Python branch on tensor
values, no data-dependent shapes, so it runs inside a ``torch.compile(fullgraph=True)`` graph.
Python branches below depend only on dtypes and static shapes.

**Score convention (all checks).** Each check returns a per-row score tensor ``score >= 0`` and a
row is flagged iff ``score > 1``: ``score = violation / tolerance``, ``+inf`` for a row holding a
NaN/Inf, ``0`` for a row that cannot be checked (fewer than two valid keys, say). The lead can
accumulate ``(score > 1)`` or ``score.amax()`` uniformly.

**Check arithmetic is float64** (``CHECK_DTYPE``), whatever the model dtype, except the
per-element work of the two softmax checks (below), of the matmul ABFT's sums over C's rows
and its A.(B.1) over a short k (float32 blocked sums: partials of at most 16 terms and a
vector's 16 lanes of them, added in float64; ``_sum_in_blocks``) and over the long rows of A
(float32, see ``matmul_checksum_score``), a float32 model's q/k/v projection prediction (float32
dot products of 64 terms, added in float64; ``linear_checksum_terms``) and the magnitudes that
only scale tolerances (``upper_matmul``), each rounding charged:

- its own rounding (u = 2^-53) is then negligible next to the model's (2^-8 for bfloat16, 2^-24
  for float32), so each tolerance is the model's error plus a sliver, which is the most
  sensitive detector the error analysis allows; with float32 checksums the check's own rounding
  of a row sum over the m = T keys (gamma_T(2^-24)) would exceed a float32 q.k product's
  (gamma_D) several times over;
- checksums of |A||B| cannot overflow (float32 sums of m values near 1e36 can);
- float64 matmuls never use TF32 or bf16 shortcuts, whatever ``set_float32_matmul_precision``
  says, so the bound on the check's own error holds on any backend (the one float32 GEMM that
  predicts, the q/k/v projection checksum's for a float32 model, ``linear_checksum_terms``,
  assumes IEEE float32 operands, as the tolerance of the float32 GEMM it checks does);
- the extra work is O(row length) per row, memory-bound and fused by ``torch.compile``; data
  centre GPUs run float64 at half or full float32 rate. Eagerly the upcast copies are
  materialised, one slice of the leading dims at a time (``EAGER_SLICE_ELEMENTS``).

**The softmax checks' per-element arithmetic is float32** (``element_dtype``; float64 for
float64 inputs), their per-row arithmetic float64. They take ~30 vector operations per element
(a count, three maxima, two minima, six sums), which on CPUs is compute-bound: float32 vectors
hold twice the lanes (measured: 2.25x faster than float64 on [4, 12, 256, 256], 2-core AVX-512
CPU), and each operation saved counts, so non-finite values are found from row sums (a sum is
NaN or infinite iff a term is, or it overflowed, and then the row is flagged too) rather than
by per-element tests.
float32 holds float32/bfloat16/float16 inputs exactly, so maxima, minima and counts stay exact;
only the products and sums round, at u_e = 2^-24, which the tolerances charge: gamma_L(u_e)
times the sum of the magnitudes (Higham's dot-product bound again), about 1/6 of a float32
softmax's own error (gamma_{6L}) and negligible next to a 16-bit one. A float32 sum of L
magnitudes can overflow only for |logits| >= 3.4e38 / L (>= 5e33 for any L <= 65536); such a
row's statistics become non-finite and the row is flagged, like a row holding Inf.

**Tolerances** start from Higham's bound (*Accuracy and Stability of Numerical Algorithms*, 2nd
ed., section 3.1): a computed dot product satisfies
``|fl(x.y) - x.y| <= gamma_k |x|.|y|`` with ``gamma_k = k u / (1 - k u)``, for *any* summation
order (so BLAS blocking, split-K and ``torch.compile`` reordering are covered), and a product of
k factors ``(1 + d_i)^(+-1)`` with ``|d_i| <= u`` lies in ``[1 - gamma_k, 1 + gamma_k]``
(Lemma 3.1); gamma_j + gamma_k + gamma_j gamma_k <= gamma_{j+k} (Lemma 3.3). Rounding a value v
to a format with unit roundoff u (round to nearest) errs by at most ``u |v|`` and also by at
most ``u |fl(v)|`` (fl(v) = v / (1 + d), |d| <= u; Higham section 2.2). Underflow adds an absolute
error: we charge each rounding that can underflow the format's smallest *normal* number (as if
the hardware flushed subnormals to zero), except conversions to the 16-bit output formats,
which keep subnormals on CPUs and GPUs and err by at most half the smallest subnormal.

Stated constants (not tuned):

- ``_ACC_FACTOR = 2``: GEMM accumulators may truncate instead of rounding to nearest (NVIDIA
  tensor cores do: Fasi, Higham, Mikaitis, Pranesh, "Numerical behavior of NVIDIA tensor
  cores", PeerJ Comput. Sci. 2021); truncation errs by < 1 ulp = 2u. So a GEMM's accumulation
  unit roundoff is ``2 u_fp32`` for 16/32-bit GEMMs (they accumulate in float32) and
  ``2 u_fp64`` for float64.
- ``_EXP_ULPS_U = 4``: ``exp`` is accurate to 2 ulp in CUDA's ``expf`` (CUDA C++ Programming
  Guide, "Mathematical Functions"), about as accurate in Triton's ``ex2.approx``-based exp, and
  to 1 ulp in the Sleef ``u10`` kernels PyTorch uses on CPUs; 2 ulp <= 4u.
- ``_EXP_ARG_U = 3``: the exponent argument ``(a_j - max) * log2(e)`` takes one rounding for the
  subtraction, one for the product and one for the constant log2(e): an absolute argument error
  of at most ``3 u |a_j - max|``, i.e. a relative error ``e^(3u|t|) - 1`` of the exponential.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from fxsdc.utils import logger

CHECK_DTYPE = torch.float64
_ACC_FACTOR = 2.0
_EXP_ULPS_U = 4
_EXP_ARG_U = 3
# Tail cut in the softmax error model (_exp_arg_factor): keys more than _T0 below the max weigh
# at most e^-_T0 each; any cut >= 1 is valid, 64 makes the tail term ~1e-26 per key.
_T0 = 64.0
# Eagerly, a per-row check over attention-sized tensors runs on slices of its leading (batch,
# head) dims of at most this many elements each (``sliced_when_eager``). Each elementwise step
# materialises a tensor the size of its inputs (float32 copies of bfloat16 weights, masks,
# products); whole, those raised the eager peak of GPT-2 with all checks (bfloat16, 8 x 1024, two
# layers, CPU) from 902 to 2567 MiB. In slices of 4 M elements (16 MiB as float32) they stay under
# what the model frees before its LM head: 922 MiB, the injection nodes' own peak. The rows are
# independent, so the slices give bitwise the same scores; compiled graphs are not sliced
# (inductor fuses the steps into loops that keep no such temporaries).
EAGER_SLICE_ELEMENTS = 1 << 22


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = 2^-p for a p-bit significand: 2^-8 bf16, 2^-11 fp16, 2^-24 fp32, 2^-53 fp64."""
    return torch.finfo(dtype).eps / 2


def gamma(k: int, u: float) -> float:
    """Higham's gamma_k = k u / (1 - k u); +inf once k u >= 1 (no bound, so no flag)."""
    ku = k * u
    return ku / (1.0 - ku) if ku < 1.0 else math.inf


U_CHECK = unit_roundoff(CHECK_DTYPE)
_TINY_CHECK = torch.finfo(CHECK_DTYPE).tiny


def _slack(n_ops: int) -> float:
    """Inflate a tolerance that was itself evaluated in CHECK_DTYPE from non-negative terms.

    A sum/product chain of ``n_ops`` roundings of non-negative terms is at least ``(1 - gamma)``
    times its exact value, and the final ``violation / tolerance`` and the subtraction inside the
    violation add three more roundings: dividing by ``1 - gamma_{n_ops + 3}`` keeps the computed
    score <= 1 whenever the exact violation is within the exact bound.
    """
    return 1.0 / (1.0 - gamma(n_ops + 3, U_CHECK))


def _out_eta(dtype: torch.dtype) -> float:
    """Absolute error of one rounding to ``dtype`` near underflow (see module docstring)."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps / 2  # half a subnormal
    return torch.finfo(dtype).tiny


def default_gemm_roundoff(out_dtype: torch.dtype, *in_dtypes: torch.dtype) -> tuple[float, float]:
    """``(input_u, accum_u)`` of a GEMM producing ``out_dtype`` under torch's default flags.

    accum_u = ``_ACC_FACTOR * u`` of the float32 (float64) accumulator. input_u bounds the
    relative error of the GEMM's own rounding of each operand: 0 when the operands are stored
    in ``out_dtype`` (they go in exactly); when one is stored finer (autocast: fp32 tensors, bf16
    GEMM) it is rounded to ``out_dtype`` first, by truncation at worst: input_u = 2 u_out.
    """
    acc = torch.float64 if out_dtype == torch.float64 else torch.float32
    u_out = unit_roundoff(out_dtype)
    input_u = 2 * u_out if any(unit_roundoff(d) < u_out for d in in_dtypes) else 0.0
    return input_u, _ACC_FACTOR * unit_roundoff(acc)


def gemm_roundoff(dtype: torch.dtype, device_type: str = "cpu") -> tuple[float, float]:
    """Host-side ``(input_u, accum_u)`` for GEMMs in ``dtype`` under torch's current global flags.

    Call it when building the graph (it reads global matmul settings, which a compiled graph
    must not) and pass both values to the ABFT checks. float32 GEMMs under
    ``set_float32_matmul_precision("high"/"medium")`` (or the backend ``fp32_precision`` knobs,
    or legacy ``allow_tf32``) round their operands to TF32 (11-bit significand) or bf16, by
    truncation at worst: input_u = 2^-10 or 2^-7. bf16/fp16 GEMMs on CUDA with
    ``allow_{bf16,fp16}_reduced_precision_reduction`` (PyTorch's default: True) may round split-K
    partial sums to the 16-bit output type and add them there; the number of splits is not
    known, so the accumulation is charged at the output's precision (x2 for truncation). That
    bound is valid but so loose that long dot products become uncheckable (tolerance +inf,
    score 0): turn those flags off when running the ABFT checks.
    """
    input_u, accum_u = default_gemm_roundoff(dtype)
    if dtype == torch.float32:
        backend = torch.backends.cuda.matmul if device_type == "cuda" else torch.backends.mkldnn.matmul
        knob = getattr(backend, "fp32_precision", "none")
        if knob == "none":
            try:
                knob = {"high": "tf32", "medium": "bf16"}.get(torch.get_float32_matmul_precision(), "ieee")
            except RuntimeError:  # legacy and new precision APIs mixed: assume the coarsest
                knob = "bf16"
        if device_type == "cuda" and torch.backends.cuda.matmul.allow_tf32 and knob == "ieee":
            knob = "tf32"
        if knob == "tf32":
            input_u = 2 * 2.0**-11
        elif knob == "bf16":
            input_u = 2 * unit_roundoff(torch.bfloat16)
    elif device_type == "cuda" and (
        (dtype == torch.bfloat16 and torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction)
        or (dtype == torch.float16 and torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction)
    ):
        logger.warning("%s GEMMs may reduce split-K partials in %s: ABFT tolerances will be very "
                       "loose; disable torch.backends.cuda.matmul.allow_*_reduced_precision_reduction",
                       dtype, dtype)
        accum_u = _ACC_FACTOR * unit_roundoff(dtype)
    return input_u, accum_u


def use_float32_gemm_accumulation() -> None:
    """Make CUDA's bf16/fp16 GEMMs reduce split-K partial sums in float32, as the ABFT tolerances
    (``default_gemm_roundoff``) assume. PyTorch's default lets cuBLAS reduce them in the 16-bit
    type, an error the checks can only cover with uselessly loose tolerances (``gemm_roundoff``).
    A global torch setting; it changes nothing on CPUs or for float32 GEMMs."""
    matmul = torch.backends.cuda.matmul
    if matmul.allow_bf16_reduced_precision_reduction or matmul.allow_fp16_reduced_precision_reduction:
        logger.info("ABFT checks: turning off torch.backends.cuda.matmul."
                    "allow_{bf16,fp16}_reduced_precision_reduction (float32 GEMM accumulation)")
    matmul.allow_bf16_reduced_precision_reduction = False
    matmul.allow_fp16_reduced_precision_reduction = False


def _gemm_rel(k: int, input_u: float, accum_u: float) -> float:
    """Relative error bound (w.r.t. |A||B|) of one GEMM output entry before output rounding.

    Each product of rounded operands errs by at most d_in = (1 + input_u)^2 - 1 relative to the
    exact product (the product of the rounded operands is exact in the accumulator), and the k
    accumulations by gamma_k(accum_u) relative to the sum of those products' magnitudes.
    """
    d_in = (1 + input_u) ** 2 - 1
    return d_in + gamma(k, accum_u) * (1 + d_in)


def in_eager_layout(t: torch.Tensor) -> torch.Tensor:
    """``t``; under torch.compile realised with the strides it has eagerly (no copy where
    inductor's layout already matches), where inductor would otherwise pick a layout for it,
    a reduction's output, say, in the memory order of what the reduction reads."""
    if not torch.compiler.is_compiling():
        return t
    from torch._inductor import inductor_prims  # noqa: F401  (registers the prim)
    return torch.ops.prims.inductor_force_stride_order(t, t.stride())


def _narrow_like(x: object, dim: int, start: int, length: int, ndim: int) -> object:
    """``x`` narrowed on the leading dim ``dim`` of an ``ndim``-d broadcast, where x has it with
    more than one entry; any other argument (a broadcast size-1 or missing dim, a table, a
    scalar) is shared by every slice."""
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        return x
    own = dim - (ndim - x.dim())  # broadcasting aligns dims from the right
    if own < 0 or x.shape[own] == 1:
        return x
    return x.narrow(own, start, length)


def _in_slices(fn: Callable[..., torch.Tensor], args: tuple, kwargs: dict, dim: int,
               lead: tuple[int, ...], ndim: int, limit: int) -> torch.Tensor:
    """``fn(*args, **kwargs)`` over slices of the leading dims ``lead`` from ``dim`` on, each
    slice's largest tensor argument holding at most ``limit`` elements where the dims allow."""
    def per_index(t: torch.Tensor) -> int:
        own = dim - (ndim - t.dim())
        return t.numel() // t.shape[own] if own >= 0 and t.shape[own] > 1 else t.numel()

    largest = max(per_index(t) for t in (*args, *kwargs.values())
                  if isinstance(t, torch.Tensor) and t.dim() >= 2)
    deeper = largest > limit and dim + 1 < len(lead)  # one index is still too large
    step = 1 if deeper else max(1, limit // max(largest, 1))
    if step >= lead[dim]:
        return (_in_slices(fn, args, kwargs, dim + 1, lead, ndim, limit) if deeper
                else fn(*args, **kwargs))
    pieces = []
    for start in range(0, lead[dim], step):
        length = min(step, lead[dim] - start)
        part = tuple(_narrow_like(a, dim, start, length, ndim) for a in args)
        part_kw = {k: _narrow_like(v, dim, start, length, ndim) for k, v in kwargs.items()}
        pieces.append(_in_slices(fn, part, part_kw, dim + 1, lead, ndim, limit) if deeper
                      else fn(*part, **part_kw))
    return torch.cat(pieces, dim)


def sliced_when_eager(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Decorate a per-row check whose tensor arguments share leading (batch, head) dims and end
    in two dims of their own (rows and keys, or a GEMM operand's): run eagerly, it is evaluated
    on slices of those leading dims of at most ``EAGER_SLICE_ELEMENTS`` elements each, which
    bounds its temporaries (see there); under ``torch.compile`` it runs whole."""
    @functools.wraps(fn)
    def sliced(*args, **kwargs):
        if torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        shapes = [t.shape for t in (*args, *kwargs.values())
                  if isinstance(t, torch.Tensor) and t.dim() >= 3]
        if not shapes:
            return fn(*args, **kwargs)
        ndim = max(len(s) for s in shapes)
        lead = torch.broadcast_shapes(*(s[:-2] for s in shapes))
        return _in_slices(fn, args, kwargs, 0, tuple(lead), ndim, EAGER_SLICE_ELEMENTS)
    return sliced


def _finish(violation: torch.Tensor, tol: torch.Tensor, nonfinite: torch.Tensor,
            checkable: torch.Tensor | None = None) -> torch.Tensor:
    """Apply the score convention: violation/tol, 0 where not checkable, +inf where non-finite."""
    score = violation / tol
    zero = torch.zeros((), dtype=score.dtype, device=score.device)
    if checkable is not None:
        score = torch.where(checkable, score, zero)
    # A NaN score in a checkable finite row (inf/inf: a tolerance that overflowed) is reported,
    # not hidden: it becomes +inf like a non-finite row (score != score: NaN; see nan_or_posinf).
    return torch.where(nonfinite | (score != score), torch.full_like(score, math.inf), score)


# --------------------------------------------------------------------------------------------
# Softmax: error model of a computed softmax row
# --------------------------------------------------------------------------------------------
#
# Let the exact weights be w_j = e^{-t_j} / s, t_j = a* - a_j >= 0, s = sum_j e^{-t_j} >= 1, over
# L keys (masked keys give exact zeros and add nothing). torch computes softmax for 16/32-bit
# outputs in float32 (u_i = 2^-24; float64 for float64 outputs), eagerly in two passes or, under
# inductor, online (running max, rescaling the running sum by exp(m_old - m_new) at each step),
# then rounds to the output dtype (u_w). Per key, the numerator exp(t_j) carries the argument
# error e^{+-3 u_i t_j} and exp + division (reciprocal and product) errors, 6 factors. The
# denominator: every term passes through at most L rescale/add steps of 6 factors (exp 4, product,
# sum) plus its own exp: s_hat/s in [(1 - g)(1 - x6), (1 + g)(1 + x6)], g = gamma_{6L+4}(u_i),
# where x6 bounds sum_j w_j (e^{6 u_i t_j} - 1) (argument errors of the term's own exp and of the
# rescales after it, which telescope to at most t_j) - see _exp_arg_factor. Hence
#     w_hat_j = w_j * rho_j + eta,    rho_j in [lo * e^{-3 u_i t_j}, hi * e^{3 u_i t_j}],
#     hi = (1 + gamma_6)(1 + u_w) / ((1 - g)(1 - x6)),  lo = (1 - gamma_6)(1 - u_w) / ((1 + g)(1 + x6)),
# and |eta| <= eta_w = half a subnormal of the output + 2 smallest normals of u_i's format
# (flush-to-zero of exp and of the division).


def _softmax_u(weights_dtype: torch.dtype) -> tuple[float, float]:
    """(u_i, u_w): unit roundoff of the softmax's internal arithmetic and of its output."""
    internal = torch.float64 if weights_dtype == torch.float64 else torch.float32
    return unit_roundoff(internal), unit_roundoff(weights_dtype)


def _softmax_eta(weights_dtype: torch.dtype) -> float:
    internal = torch.float64 if weights_dtype == torch.float64 else torch.float32
    return _out_eta(weights_dtype) + 2 * torch.finfo(internal).tiny


def _exp_arg_factor(c: float, length: int) -> float:
    """Bound on sum_j w_j (e^{c t_j} - 1) for exact softmax weights over ``length`` keys.

    Split at t = _T0. Keys with t_j <= _T0: e^{ct} - 1 <= c t e^{c _T0}, and sum_j w_j t_j = eps
    (the softmax deviation) <= W((n-1)/e) <= ln(n) <= ln(length) (DESIGN section 3). Keys with
    t_j > _T0: w_j <= e^{-t_j} (s >= 1), so w_j (e^{ct_j} - 1) <= c t e^{-(1-c)t}, decreasing for
    t > 1/(1-c), hence <= c _T0 e^{-(1-c)_T0} each. No logits needed, so the bound also serves
    the sum check, which may run without them. The lower side, sum_j w_j (1 - e^{-ct_j}) <= c eps,
    is smaller.
    """
    return c * (math.exp(c * _T0) * math.log(max(length, 1))
                + length * _T0 * math.exp(-(1.0 - c) * _T0))


def _softmax_hi_lo(weights_dtype: torch.dtype, length: int) -> tuple[float, float, float]:
    """(hi, lo, u_i) of the softmax error model above for rows of ``length`` keys."""
    u_i, u_w = _softmax_u(weights_dtype)
    x6 = _exp_arg_factor(2 * _EXP_ARG_U * u_i, length)
    g = gamma(6 * length + _EXP_ULPS_U, u_i)
    g6 = gamma(2 + _EXP_ULPS_U, u_i)
    hi = (1 + g6) * (1 + u_w) / ((1 - g) * (1 - x6))
    lo = (1 - g6) * (1 - u_w) / ((1 + g) * (1 + x6))
    return hi, lo, u_i


def softmax_sum_tolerance(weights_dtype: torch.dtype, length: int) -> float:
    """Tolerance of ``softmax_sum_score`` on |S - 1| and |A - 1|: a Python float, fixed by dtype
    and length.

    |sum_j w_hat_j - 1| <= max(hi (1 + x3) - 1, 1 - lo (1 - x3)) + L eta_w, because
    sum_j w_j rho_j <= hi sum_j w_j e^{3 u_i t_j} <= hi (1 + x3) (x3 = _exp_arg_factor with
    c = 3 u_i), plus the check's own sum: L - 1 additions in the element dtype (u_e) and the
    float64 subtraction of 1, together <= gamma_{L+1}(u_e) (1 + tol). The bound holds for A, the
    sum of |w_hat_j|, word for word: a computed softmax weight is never negative (exp >= 0,
    rounding monotone), so A adds the same terms as S.
    """
    hi, lo, u_i = _softmax_hi_lo(weights_dtype, length)
    x3 = _exp_arg_factor(_EXP_ARG_U * u_i, length)
    eta = _softmax_eta(weights_dtype)
    u_e = unit_roundoff(element_dtype(weights_dtype))
    model = max(hi * (1 + x3) - 1, 1 - lo * (1 - x3)) + length * eta
    return (model + gamma(length + 1, u_e) * (1 + model) + _TINY_CHECK) * _slack(length + 4)


def nan_or_posinf(x: torch.Tensor) -> torch.Tensor:
    """``isnan(x) | isposinf(x)`` as one comparison (NaN compares False). Same result; inductor's
    CPU backend vectorises comparisons but runs ``isnan`` as a scalar loop, per element."""
    return ~(x < math.inf)


def not_finite(x: torch.Tensor) -> torch.Tensor:
    """``~isfinite(x)`` as one comparison, for the reason of ``nan_or_posinf``."""
    return nan_or_posinf(x.abs())


def element_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """Dtype of the softmax checks' per-element arithmetic: float32, which holds float32,
    bfloat16 and float16 values exactly, or float64 when an input is float64."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def valid_keys(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Valid (unmasked) keys: ``mask`` True and logits above finfo(dtype).min / 2.

    That threshold catches -inf, ``torch.where(mask, x, finfo.min)`` and additive finfo.min masks
    (x + finfo.min stays below min/2 for any |x| < max/2). NaN compares False, so NaN logits count
    as masked here; the callers flag them as non-finite separately.
    """
    valid = logits > torch.finfo(logits.dtype).min / 2
    if mask is not None:
        valid = valid & mask.to(torch.bool)
    return valid


@sliced_when_eager
def softmax_sum_score(weights: torch.Tensor, logits: torch.Tensor | None = None,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row score that softmax ``weights`` (keys on the last dim) and their absolute values
    each sum to 1, which confines every weight to [-tol, 1 + tol].

    ``weights``: the tensor downstream ops consume, in the dtype the softmax produced (its dtype
    sets u_w: a float64 copy of bf16 weights would be judged at float64 precision - pass the
    original). Masked weights must be ~0: they are included in both sums, so a non-zero masked
    weight shows up as excess mass.
    ``logits``/``mask`` (optional, see ``valid_keys``): rows with no valid key (fully masked, e.g.
    padded queries under finfo.min masks, where softmax returns uniform weights) are not checked.
    Score = max(|S - 1|, |A - 1|) / tol with S = sum_j w_j, A = sum_j |w_j| and the tolerance of
    ``softmax_sum_tolerance``; +inf if any weight in the row is NaN/Inf.
    Why two sums and no row minimum and maximum: A - S = 2 sum_j max(-w_j, 0) and every
    w_j <= A, so S and A within tol of 1 hold each weight in [-tol, 1 + tol] (to rounding), as a
    range test from the row's extremes would with its own tolerance, ~0.85 tol (both are about
    (6L + 4) u_i); a single faulty weight that moves by more than ~2 tol fails either way. A sum
    is one addition per element where inductor's NaN-propagating maximum and minimum are four
    instructions each (measured on one GPT-2 small layer at 4 x 256, compiled, one thread: the
    pass over the weights 0.97 -> 0.73 ms).
    Assumes the softmax saw its logits exactly in its internal precision (true unless float64
    logits feed a lower-precision softmax).
    """
    tol = softmax_sum_tolerance(weights.dtype, weights.shape[-1])
    w = weights.to(element_dtype(weights.dtype))
    total = w.sum(-1).to(CHECK_DTYPE)
    abs_total = w.abs().sum(-1).to(CHECK_DTYPE)
    score = torch.maximum((total - 1).abs(), (abs_total - 1).abs()) / tol
    nonfinite = not_finite(total)  # a NaN/Inf weight makes the sum NaN/Inf
    checkable = None
    if logits is not None and mask is None:
        # Some valid key iff the row maximum is one: the same reduction as the softmax's own
        # maximum (float32, keepdim, as the softmax's), computed once (passes.merge_reductions).
        row_max = logits.to(element_dtype(logits.dtype)).amax(-1, keepdim=True).squeeze(-1)
        checkable = row_max > torch.finfo(logits.dtype).min / 2
    elif logits is not None:
        checkable = valid_keys(logits, mask).any(-1)
    elif mask is not None:
        checkable = mask.to(torch.bool).expand_as(w).any(-1)
    one = torch.ones((), dtype=CHECK_DTYPE, device=w.device)
    return _finish(score, one, nonfinite, checkable)


# --------------------------------------------------------------------------------------------
# Softmax: bounds on the deviation eps (s@w path)
# --------------------------------------------------------------------------------------------


def top2_values(x: torch.Tensor, valid: torch.Tensor, row_max: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest and second-largest valid entry of each row (last dim), a tie counting twice.

    Two max reductions and a count instead of ``torch.topk``: they fuse with the other row
    reductions of the checks, where topk is a separate sorting kernel. Rows with fewer than two
    valid entries get -inf where a value is missing. ``row_max`` (optional, keepdim): the
    largest valid entry when the caller already has it; the count and the second value then
    need no maximum of their own first, and join the other row sums in one loop. Rows without a
    valid entry then give unspecified values.
    """
    neg_inf = torch.full((), -math.inf, dtype=x.dtype, device=x.device)
    x = torch.where(valid, x, neg_inf)
    first = x.amax(-1, keepdim=True) if row_max is None else row_max
    at_max = x == first  # all True in an all-invalid row (-inf == -inf): both values -inf
    ties = at_max.to(x.dtype).sum(-1)  # a float count: exact below 2^24, and vectorised
    rest = torch.where(at_max, neg_inf, x).amax(-1)
    first = first.squeeze(-1)
    return first, torch.where(ties >= 2, first, rest)


def softmax_row_stats(logits: torch.Tensor, weights: torch.Tensor, w_table: torch.Tensor,
                      mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-row quantities of DESIGN section 3, as float64, masked keys excluded.

    Returns a dict of tensors shaped like ``logits.shape[:-1]``:
    ``n`` (valid keys), ``a_star`` = max_V a, ``gamma`` = a* - second max_V a (margin),
    ``w_star`` = max_V w, ``epsilon`` = a* - sum_V w_j a_j, ``lower1`` = gamma / (1 + e^gamma),
    ``middle`` = gamma (1 - w*), ``upper1`` = a* - mean_V a, ``upper2`` = tau(gamma, n),
    ``w_n`` = W((n-1)/e), ``a_min`` = min_V a, ``m1`` >= sum_V |w_j a_j|, ``m0`` >= sum_V |a_j|
    (upper bounds: the sums are taken in ``element_dtype`` and scaled up by 1 / (1 - gamma_L(u_e)),
    since a computed sum of L non-negative terms is at least (1 - gamma_L) times the exact one),
    ``checkable`` (n >= 2 and finite) and ``nonfinite`` (a NaN/Inf weight anywhere in the row, a
    +Inf valid logit, or a row sum that overflowed; found from the row sums, see the module
    docstring. NaN logits are not valid keys and are seen through the weights: a softmax row
    with a NaN input is NaN throughout). Values in rows that are not checkable are unspecified.
    ``w_table``: ``bounds.lambertw_table(n_max)`` with ``n_max >= logits.shape[-1]`` (any float
    dtype, on the logits' device; float64 keeps it exact).
    """
    length = logits.shape[-1]
    if w_table.shape[0] < length + 1:
        raise ValueError(f"w_table has {w_table.shape[0]} entries; rows of {length} keys need "
                         f"lambertw_table({length}) or larger")
    if logits.dtype == torch.float64 and weights.dtype != torch.float64:
        raise ValueError("float64 logits with lower-precision weights: the softmax rounded its "
                         "input first, which this error model does not cover; pass the logits "
                         "the softmax actually read")
    valid = valid_keys(logits, mask)
    # Per element in float32 (exact for the inputs; products and sums charged in the
    # tolerance), per row in float64.
    elem = element_dtype(logits.dtype, weights.dtype)
    a = logits.to(elem)
    w = weights.to(elem)
    zero = torch.zeros((), dtype=elem, device=a.device)
    n = valid.to(elem).sum(-1).long()  # exact: rows are shorter than 2^24 keys
    # Without a mask, valid keys are those above finfo.min / 2 and every masked one is below,
    # so the maximum over all keys is the valid maximum (in rows with a valid key; the others
    # are not checkable). It is the softmax's own maximum, which the compiled graph then
    # computes once (passes.merge_reductions).
    row_max = logits.to(elem).amax(-1, keepdim=True) if mask is None else None
    a_star, second = (v.to(CHECK_DTYPE) for v in top2_values(a, valid, row_max))
    gam = a_star - second
    a_v = torch.where(valid, a, zero)
    wa = torch.where(valid, w * a, zero)
    nf = n.to(CHECK_DTYPE)
    wa_sum = wa.sum(-1).to(CHECK_DTYPE)
    epsilon = a_star - wa_sum
    w_star = torch.where(valid, w, zero).amax(-1).to(CHECK_DTYPE)
    w_n = w_table.to(CHECK_DTYPE)[n]
    grow = 1.0 / (1.0 - gamma(length, unit_roundoff(elem)))
    e = torch.exp(-gam)
    tail = (nf - 1) * gam * e / (1 + (nf - 1) * e)
    m1 = wa.abs().sum(-1).to(CHECK_DTYPE) * grow
    m0 = a_v.abs().sum(-1).to(CHECK_DTYPE) * grow
    # Non-finite inputs from row sums instead of per-element tests: a NaN/Inf weight makes the
    # sum of all weights NaN/Inf, a +Inf valid logit makes m0 infinite.
    nonfinite = not_finite(w.sum(-1)) | not_finite(m0) | not_finite(m1) | not_finite(wa_sum)
    return {
        "n": n,
        "a_star": a_star,
        "gamma": gam,
        "w_star": w_star,
        "epsilon": epsilon,
        "lower1": gam / (1 + torch.exp(gam)),
        "middle": gam * (1 - w_star),
        "upper1": a_star - a_v.sum(-1).to(CHECK_DTYPE) / nf.clamp(min=1),
        "upper2": torch.where(gam < 1 + w_n, w_n, tail),
        "w_n": w_n,
        "a_min": torch.where(valid, a, torch.full((), math.inf, dtype=elem,
                                                   device=a.device)).amin(-1).to(CHECK_DTYPE),
        "m1": m1,
        "m0": m0,
        "checkable": (n >= 2) & ~nonfinite,
        "nonfinite": nonfinite,
    }


def softmax_bounds_tolerance(stats: dict[str, torch.Tensor], weights_dtype: torch.dtype,
                             length: int) -> torch.Tensor:
    """Per-row absolute tolerance on ``lower <= eps <= upper`` for computed softmax weights.

    From the error model above, with R = a* - min_V a known per row:
      theta = max(hi e^{3 u_i R} - 1, 1 - lo e^{-3 u_i R}),  theta' = theta / (1 - theta):
      |w_hat_j - w_j| <= theta w_j + eta_w <= theta' w_hat_j + (1 + theta') eta_w.
    E_eps = theta' M1 + (1 + theta') eta_w M0     (eps = a* - sum_V w_j a_j moves by
            sum_V |w_hat_j - w_j| |a_j|: this is where the logits' magnitude enters,
            M1 = sum_V |w_hat_j a_j|, M0 = sum_V |a_j|)
    E_mid = gamma (theta' w_hat* + (1 + theta') eta_w)   (middle = gamma (1 - w*) reads w_hat*)
    E_chk = gamma_{L+16}(u_c) (2|a*| + M1 + M0 + 2 gamma + |middle| + W_n) + 2 u_c gamma W_n
            (float64 evaluation of eps (gamma_{L+1}), of a* - mean (gamma_{L+2}), of
            gamma/(1+e^gamma) (gamma_8, |f'| <= 1), of gamma(1 - w*) (gamma_3), and of tau: its
            log-derivative in gamma is within [-1, 1] (d ln tau/d gamma = 1/gamma - 1 +
            (n-1)e^-g/(1+(n-1)e^-g)) so a rounded gamma moves it by <= u_c gamma tau, plus
            gamma_16 for exp, the table entry and the five operations; mis-branching at
            gamma = 1 + W is harmless because tau is continuous there.)
    E_sum = gamma_L(u_e) (M1 + M0 / n)
            (the sums over the row in the element dtype, ``element_dtype``: sum_V w_j a_j, L
            products and L - 1 additions, errs by <= gamma_L(u_e) M1; sum_V a_j by
            <= gamma_{L-1}(u_e) M0, divided by n in the mean. Their conversion to float64 is exact
            and the float64 steps after it are in E_chk.)
    tol = (E_eps + E_mid + E_chk + E_sum) * slack: one tolerance for both sides (each side's
    error is at most the sum).
    """
    hi, lo, u_i = _softmax_hi_lo(weights_dtype, length)
    eta = _softmax_eta(weights_dtype)
    u_e = unit_roundoff(element_dtype(weights_dtype))  # float64 logits need float64 weights
    big_r = (stats["a_star"] - stats["a_min"]).clamp(min=0)
    theta = torch.maximum(hi * torch.exp(_EXP_ARG_U * u_i * big_r) - 1,
                          1 - lo * torch.exp(-_EXP_ARG_U * u_i * big_r))
    theta_p = torch.where(theta < 1, theta / (1 - theta), torch.full_like(theta, math.inf))
    gam = stats["gamma"]
    e_eps = theta_p * stats["m1"] + (1 + theta_p) * eta * stats["m0"]
    e_mid = gam * (theta_p * stats["w_star"].abs() + (1 + theta_p) * eta)
    e_chk = (gamma(length + 16, U_CHECK)
             * (2 * stats["a_star"].abs() + stats["m1"] + stats["m0"] + 2 * gam
                + stats["middle"].abs() + stats["w_n"])
             + 2 * U_CHECK * gam * stats["w_n"])
    e_sum = gamma(length, u_e) * (stats["m1"] + stats["m0"] / stats["n"].clamp(min=1))
    return (e_eps + e_mid + e_chk + e_sum + _TINY_CHECK) * _slack(length + 32)


@sliced_when_eager
def softmax_bounds_score(logits: torch.Tensor, weights: torch.Tensor, w_table: torch.Tensor,
                         mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row score of ``max(lower1, middle) <= eps <= min(upper1, tau)`` (DESIGN section 3).

    ``logits``: the tensor that entered softmax (scaled, masked), keys on the last dim;
    ``weights``: the softmax output as consumed downstream (same shape, its own dtype);
    ``w_table``: ``bounds.lambertw_table(n)`` with n >= logits.shape[-1], kept as a buffer on
    the logits' device; ``mask`` (optional, True = valid) on top of the finfo.min/-inf rule.
    eps = a* - sum_V w_j a_j is the seed's "s@w" deviation. Score = max(lower - eps,
    eps - upper, 0) / tol (``softmax_bounds_tolerance``); 0 for rows with n < 2; +inf for rows
    with NaN/+Inf logits or NaN/Inf weights.
    """
    stats = softmax_row_stats(logits, weights, w_table, mask)
    tol = softmax_bounds_tolerance(stats, weights.dtype, logits.shape[-1])
    lower = torch.maximum(stats["lower1"], stats["middle"])
    upper = torch.minimum(stats["upper1"], stats["upper2"])
    eps = stats["epsilon"]
    violation = torch.maximum(lower - eps, eps - upper).clamp(min=0)
    return _finish(violation, tol, stats["nonfinite"], stats["checkable"])


# --------------------------------------------------------------------------------------------
# ABFT checksums
# --------------------------------------------------------------------------------------------


def _scale_parts(scale: float | torch.Tensor | None,
                 device: torch.device) -> tuple[float | torch.Tensor, float | torch.Tensor]:
    """(scale, |scale|) as a float64 0-dim tensor or a Python float; (1.0, 1.0) for None."""
    if scale is None:
        return 1.0, 1.0
    if isinstance(scale, torch.Tensor):
        s = scale.to(device=device, dtype=CHECK_DTYPE)
        return s, s.abs()
    return float(scale), abs(float(scale))


_BLOCK = 16  # at most this many terms in a partial sum
_LANES = 16  # partial sums per row: a multiple of this (16 float32 lanes of an AVX-512 vector)


def _block_shape(length: int) -> tuple[int, int]:
    """(b, nb): ``_sum_in_blocks`` splits a row of ``length`` terms into nb partial sums of at
    most b <= ``_BLOCK`` terms, nb the least multiple of ``_LANES`` with nb * _BLOCK >= length.

    nb is at least 16 because inductor's C++ backend vectorises the loop over the partials 16
    floats wide: with fewer (GPT-2's weights . V rows of 64 terms made 4 partials of 16), the
    loop ran masked and, with more than one thread, inductor's parallel-depth heuristic counted
    floor(4 / 16) = 0 steps in the loops over rows and partials and parallelised the 16-term
    reduction instead, opening an OpenMP region for each of the 12288 rows of a layer: that
    kernel took 18.1 ms against 2.2 ms with 16 partials of 4 terms (2 threads, one GPT-2 small
    layer, 4 x 256 float32, profiles; on one thread no difference beyond their noise)."""
    nb = _LANES * max(1, -(-length // (_BLOCK * _LANES)))
    return max(1, -(-length // nb)), nb


def _blocked(x: torch.Tensor) -> torch.Tensor:
    """``x[..., L]`` zero-padded to b * nb terms and viewed as ``[..., b, nb]`` (``_block_shape``):
    column j holds elements j, j + nb, ..., so reducing over dim -2 gives nb partial results of
    at most b elements each, accumulated lane by lane in vector registers (no reduction across
    lanes until the nb partials are combined)."""
    block, blocks = _block_shape(x.shape[-1])
    pad = block * blocks - x.shape[-1]
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.unflatten(-1, (block, blocks))


def _sum_in_blocks(x: torch.Tensor) -> torch.Tensor:
    """Float64 sum over the last dim: nb partial sums of at most b elements each in x's dtype
    (``_blocked``, (b, nb) = ``_block_shape(L)``), each run of ``_LANES`` partials (one vector's
    lanes) added in x's dtype too, and the nb / _LANES lane sums in float64 (one per row for
    rows of up to _BLOCK * _LANES = 256 terms). Its error: ``blocked_sum_error``.

    The lanes are not added in float64: inductor's C++ backend adds a vector's float64 lanes
    one at a time through memory (float32 lanes with vector shuffles), ~50 ns per row. GPT-2
    small's 12288 attention rows per layer (4 x 256, one thread, Xeon): 16 float32 partials
    per row summed in float64 0.67 ms, in float32 0.03 ms; the blocked sums of one layer's
    checks took ~2.5 ms less (paired per-loop timings of the compiled layer)."""
    lanes = _blocked(x).sum(-2)
    return lanes.unflatten(-1, (-1, _LANES)).sum(-1).to(CHECK_DTYPE).sum(-1)


@sliced_when_eager
def matmul_checksum_score(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *,
                          scale: float | torch.Tensor | None = None,
                          input_u: float | None = None,
                          accum_u: float | None = None) -> torch.Tensor:
    """Row-checksum ABFT for ``c = (a @ b) * scale`` (batched, broadcasting like matmul).

    Compares C.1 (row sums of the consumed ``c``) with scale * A.(B.1); returns a score of shape
    ``c.shape[:-1]``. Row checksums only: a fault in one element of C moves exactly its row's
    sum, the score is then per row like every other check, and the row sum has m = d (or n)
    terms, usually fewer than a column sum's n; column checksums would cost a second pass and
    give per-column information the score convention cannot carry.

    ``scale`` (optional, float or 0-dim tensor): the model multiplied the product by it, or
    divided by a constant (pass 1 / divisor, with the divisor as the model stored it: a bf16
    ``torch.full`` divisor is the bf16 value; a Python float stays as it is).
    ``input_u``/``accum_u``: the GEMM's rounding of its operands and of its accumulation
    (``gemm_roundoff`` reads torch's flags; default ``default_gemm_roundoff(c.dtype, a.dtype,
    b.dtype)``: exact operands - or autocast's rounding when a or b is finer than c - and fp32
    accumulation for 16/32-bit, x2 for truncating accumulators).

    **Where the check's arithmetic runs.** The per-element sums over C's rows run in the element
    dtype e (float32 unless an input is float64, u_e its unit roundoff) as partial sums of at
    most ``_BLOCK`` terms each, whose lanes are added in e and the lane sums in float64
    (``_sum_in_blocks``). Converting every element to float64 instead costs more than the rest
    of the check on CPUs (inductor's C++ backend converts float32 to float64 through memory,
    element by element), while the blocked sum of a row of 256 errs by at most gamma_30(u_e),
    about 1.8e-6 relative - a quarter of a float32 GEMM's own bound at k = 64. When A's rows
    are the longer ones (k > m: weights . V, where A is attention-sized), A.(B.1) is summed in
    e over each whole row, in one loop over A with the magnitudes (A's sum of |a|, shared with
    the softmax check through ``passes.merge_reductions``, is a flat loop of its own in
    inductor's code): partial sums of A's rows would be written out and read back, which on
    one GPT-2 small layer (CPU, 4 x 256) made a second pass over the weights, 1.5 ms of a 4.5 ms
    kernel. Its rounding, gamma_k(u_e) relative to P = sum_l |a_l (B.1)_l|, is charged on P,
    summed in the same loop: with B's rows summed with cancellation, P is typically a fraction
    of Q (below), so the tolerance grows by far less than gamma_k(u_e) Q (at most by that, about
    half a float32 GEMM's own bound). When B is the long side (k <= m: q . k^T, where B is
    attention-sized), B.1 is summed in float64 (down B's columns, in the loop that copies B
    for the model's GEMM), rounded to e, and A.(B.1) summed in e over the short k in blocks
    (``_sum_in_blocks``; in float64 that is a float64 reduction per row of C, 0.9 ms of a GPT-2
    layer), its rounding charged on P, summed in the same loop. The per-row terms stay in
    float64.

    Tolerance, row i, k = inner dim, m = columns, S_i = sum_j |c_ij|, Q_i = sum_l |a_il| sum_j |b_lj|,
    A_i = sum_l |a_il|, rel_k = d_in + gamma_k(accum_u) (1 + d_in), d_in = (1 + input_u)^2 - 1:
      GEMM:    |p_ij - (AB)_ij| <= rel_k (|A||B|)_ij + u_out |p_ij| + k tiny_acc + eta_out for the
               rounded product p (operand rounding, accumulation in any order, rounding to c's
               dtype bounded by the rounded value);
      scale:   c_ij = fl(p_ij * s_eff), where s_eff is s after the opmath conversion of a scalar
               and a reciprocal for division (|s_eff - s| <= g_op |s|, g_op = gamma_2(u_fp32),
               gamma_2(u_fp64) for float64), and |p_ij s_eff| <= (1 + u_out)|c_ij|: so
               |c_ij - s (AB)_ij| <= |s| ((1 + g_op) rel_k + g_op) (|A||B|)_ij
                                     + gamma_2(u_out) |c_ij| + |s| (1 + g_op)(k tiny_acc + eta_out) + eta_out
               (without a scale: g_op = 0 and gamma_1(u_out) |c_ij|);
      check:   row sum of c in blocks: g_m S_i, g_j = ``blocked_sum_error(j, e)`` (+ m tiny_e
               for elements a flushing unit reads as zero and for flushed sums), the float64
               steps and the subtraction gamma_m(u_c) S_i;
               s * A.(B.1): B.1 in float64 costs gamma_m, the scale and its reciprocal 2,
               together <= gamma_{m+k+2}(u_c) |s| Q_i (Lemma 3.3; this bound also covers a
               float64 dot); in e (k <= m): B.1 rounded to e and each product rounded (u_e
               each, or tiny_e, times |a_l|, resp. 1, where they flush; a flushed a_l loses
               under tiny_e |(B.1)_l|), summed in blocks (g_k, + k tiny_e):
               (gamma_2(u_e) + g_k (1 + gamma_2(u_e))) |s| P_i + |s| (F_i + k tiny_e),
               F_i = 2 (k a*_i + k + sum_l |(B.1)_l|) tiny_e, a*_i = max_l |a_il|
               (A_i <= k a*_i), where P_i >= sum_l |a_il (B.1)_l| comes from the blocked sum
               of the products' magnitudes, P_i = (P_hat + F_i) / ((1 - g_k)(1 - gamma_2(u_e)))
               (raised by the float64 steps' gamma_{k+4}(u_c); ``_dot_with_row_sums``);
               in e (k > m):
               B.1 summed in e (gamma_{m-1}(u_e) per row of B, + m tiny_e per row for flushed
               elements), then the products (u_e each) and their sum over the row (k - 1
               additions, any order), each of these flushing by < tiny_e: gamma_m(u_e) |s| Q_i
               + gamma_k(u_e) |s| P_i + |s| (m A_i + 2k) tiny_e (1 + u_e)^2, where
               P_i >= sum_l |a_il (B.1)_l| comes from the computed sum of the products'
               magnitudes, P_i = (P_hat + 2k tiny_e) / (1 - gamma_k(u_e)) (raised by the
               float64 steps' gamma_{k+4}(u_c));
      tol_i  = (sum over j of the above + tiny) * slack.
    The check reads the stored operands, so beyond the GEMM's own operand rounding they carry
    no error. A row of C holding a NaN or an infinity scores +inf; a finite row whose float32
    sums overflow (entries near 1e37) is not checked (score 0) rather than flagged.
    """
    k = a.shape[-1]
    m = b.shape[-1]
    d_input_u, d_accum_u = default_gemm_roundoff(c.dtype, a.dtype, b.dtype)
    rel = _gemm_rel(k, d_input_u if input_u is None else input_u,
                    d_accum_u if accum_u is None else accum_u)
    s, s_abs = _scale_parts(scale, c.device)
    g_op = 0.0 if scale is None else gamma(2, unit_roundoff(
        torch.float64 if c.dtype == torch.float64 else torch.float32))
    u_out = unit_roundoff(c.dtype)
    eta_out = _out_eta(c.dtype)
    tiny_acc = torch.finfo(torch.float64 if c.dtype == torch.float64 else torch.float32).tiny
    elem = element_dtype(a.dtype, b.dtype, c.dtype)
    u_e, tiny_e = unit_roundoff(elem), torch.finfo(elem).tiny
    a_e, b_e, c_e = a.to(elem), b.to(elem), c.to(elem)
    lhs = _sum_in_blocks(c_e)
    nonfinite = nan_or_posinf(_blocked(c_e.abs()).amax(-2).amax(-1))
    rhs_error = 0.0
    if k > m:  # A is the long side: A.(B.1) in e, in the pass over A that reads it anyway
        b_sums, b_abs_sums = _row_sums(b_e)
        products = a_e * b_sums.unsqueeze(-2)
        rhs = products.sum(-1).to(CHECK_DTYPE) * s
        rhs_rel = gamma(m, u_e)
        # P >= sum_l |a_l (B.1)_l| from the computed sum of the products' magnitudes (k
        # non-negative terms; products and partial sums flushed by at most tiny_e each).
        grow = 1 / (1 - gamma(k + 4, U_CHECK))
        p_bound = ((products.abs().sum(-1).to(CHECK_DTYPE) + 2 * k * tiny_e)
                   * (grow / (1 - gamma(k, u_e))))
        rhs_error = s_abs * gamma(k, u_e) * p_bound
    else:  # B is the long side: B.1 in float64, A.(B.1) in e over the short k, in blocks
        b_abs_sums = b_e.abs().sum(-1)
        dot, dot_error = _dot_with_row_sums(a_e, b)
        rhs = dot * s
        rhs_rel = 0.0
        rhs_error = s_abs * dot_error
    c_bound, q_bound, a_bound = _checksum_magnitudes(a_e, c_e, b_abs_sums)
    rel_q = s_abs * ((1 + g_op) * rel + g_op + gamma(m + k + 2, U_CHECK) + rhs_rel)
    rel_c = (gamma(1 if scale is None else 2, u_out) + blocked_sum_error(m, elem)[0]
             + gamma(m, U_CHECK))
    absolute = (m * (s_abs * (1 + g_op) * (k * tiny_acc + eta_out) + eta_out + tiny_e)
                + _TINY_CHECK)
    if a_bound is not None:
        absolute = absolute + s_abs * (m * a_bound + 2 * k) * tiny_e * (1 + u_e) ** 2
    tol = (rel_q * q_bound + rhs_error + rel_c * c_bound + absolute) * _slack(m + k + 8)
    checkable = torch.isfinite(lhs) & torch.isfinite(rhs)
    return _finish((lhs - rhs).abs(), tol, nonfinite, checkable)


def _dot_with_row_sums(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A.(B.1), E)`` for ``matmul_checksum_score`` when B is the long side, float64, shaped
    like A's rows: B.1 summed in float64 (down B's columns), rounded to a's dtype e, and the
    products with A's rows in e summed in blocks (``_sum_in_blocks`` over the short k). E bounds
    the result's distance from A.(B.1)^ (B.1^ the float64 sums: their own error is the caller's)
    with g_k = ``blocked_sum_error(k, e)``, a* = max_l |a_l|:
        E = (gamma_2(u_e) + g_k (1 + gamma_2(u_e))) P + F + k tiny_e,
        F = 2 (k a* + k + sum_l |(B.1^)_l|) tiny_e,
    P = (P_hat + F) / ((1 - g_k)(1 - gamma_2(u_e))) >= sum_l |a_l (B.1^)_l|, P_hat the blocked
    sum of the products' magnitudes (derivation in ``matmul_checksum_score``'s docstring; the
    last term of F is for a_l that a flushing unit reads as zero)."""
    elem = a.dtype
    u, tiny = unit_roundoff(elem), torch.finfo(elem).tiny
    k = a.shape[-1]
    row_sums = b.to(CHECK_DTYPE).sum(-1)
    # B.1 rounded once per column (not in each row's loop), and the row results laid out
    # row-major like C's rows, whatever A's strides (q is a view of the projection's
    # [batch, seq, heads * dim]): read in C's row order by the verdict, they were gathered
    # element by element there (0.4 ms more per GPT-2 layer).
    products = a * in_eager_layout(row_sums.to(elem)).unsqueeze(-2)
    g_k, g_2 = blocked_sum_error(k, elem)[0], gamma(2, u)
    flushed = 2 * (k * a.abs().amax(-1).to(CHECK_DTYPE) + k
                   + row_sums.abs().sum(-1, keepdim=True)) * tiny
    grow = 1 / (1 - gamma(k + 4, U_CHECK))  # the float64 steps below
    dot, p_hat = (in_eager_layout(t.contiguous()) for t in (_sum_in_blocks(products),
                                                            _sum_in_blocks(products.abs())))
    p_bound = (p_hat + flushed) * (grow / ((1 - g_k) * (1 - g_2)))
    return dot, (g_2 + g_k * (1 + g_2)) * p_bound + flushed + k * tiny


def _row_sums(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_j b_lj, sum_j |b_lj|) in b's dtype, in B's row order.

    Inductor lays a reduction's output out in the memory order of what it reads: over a
    permuted view (V's heads are a view of a projection's [batch, seq, heads * dim]) the row
    sums came out [batch, seq, heads], and the pass over A then read them with a stride, one
    element at a time. Kept in their eager layout (``in_eager_layout``), they are
    written with that stride instead, 1/m as many elements, and both reductions share one loop
    over B (measured: 1.3 ms less per GPT-2 layer, 4 x 256 float32, than summing a stacked copy
    of B and |B|, which inductor lays out in the view's logical order)."""
    return in_eager_layout(b.sum(-1)), in_eager_layout(b.abs().sum(-1))


def _checksum_magnitudes(a: torch.Tensor, c: torch.Tensor, b_abs_sums: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Upper bounds, float64, on S = sum_j |c_ij|, Q = sum_l |a_il| sum_j |b_lj| and (when
    k > m, for the float32 A.(B.1) of ``matmul_checksum_score``) A = sum_l |a_il|, else None.
    ``b_abs_sums``: sum_j |b_lj| as computed in the element dtype e (float32 unless an input is
    float64; exact conversions) with any order of addition. They only scale the tolerance, so
    they are summed in e, in the same loops as the checksums.

    A computed sum of non-negative terms is at least (1 - g) times the exact sum of the terms
    it adds (any order): g_c = ``blocked_sum_error(m, e)`` for C's rows (``_sum_in_blocks``;
    the corrections below by gamma_{max(k, m) + 4}(2^-53)), g = gamma_k(u_e) for the products of
    A's rows summed whole in e (k - 1 additions and the products' rounding).
    A term that is a flushed subnormal, an underflowed product or a flushed partial sum loses
    under tiny_e. So S <= (S_hat + m tiny) / (1 - g_c). For Q, each B_l = sum_j |b_lj| is
    first raised to B~_l = B_l_hat + m tiny >= (1 - gamma_m) B_l; then
    Q <= (Q_hat + k tiny (2 + max B~)) / ((1 - g)(1 - gamma_m)) (a flushed a_l loses under
    tiny B~_l, a product or a partial sum under tiny). Likewise A <= (A_hat + k tiny) / (1 - g)
    for A's sum in e (k - 1 additions). For attention weights A_hat is the softmax check's sum
    of |w|, which the compiled graph then computes once (passes.merge_reductions).
    """
    dtype = element_dtype(a.dtype, c.dtype)
    u = unit_roundoff(dtype)
    tiny = torch.finfo(dtype).tiny
    k, m = a.shape[-1], c.shape[-1]
    long_a = k > m
    g_m, g_c, g_q = gamma(m, u), blocked_sum_error(m, dtype)[0], gamma(k, u)
    if max(g_m, g_c, g_q) >= 1:  # no bound: an infinite tolerance never flags
        inf = torch.full(c.shape[:-1], math.inf, dtype=CHECK_DTYPE, device=c.device)
        return inf, inf, inf if long_a else None
    a_e = a.to(dtype)
    row_b = b_abs_sums.to(dtype) + m * tiny
    s_hat = _sum_in_blocks(c.to(dtype).abs())
    q_hat = (a_e.abs() * row_b.unsqueeze(-2)).sum(-1).to(CHECK_DTYPE)
    grow = 1 / (1 - gamma(max(k, m) + 4, U_CHECK))  # the float64 additions and products
    c_bound = (s_hat + m * tiny) * (grow / (1 - g_c))
    b_max = row_b.amax(-1, keepdim=True).to(CHECK_DTYPE)  # broadcasts over the rows of A
    q_bound = (q_hat + k * tiny * (2 + b_max)) * (grow / ((1 - g_q) * (1 - g_m)))
    if not long_a:
        return c_bound, q_bound, None
    a_hat = a_e.abs().sum(-1).to(CHECK_DTYPE)
    return c_bound, q_bound, (a_hat + k * tiny) * (grow / (1 - g_q))


def linear_checksum_score(x: torch.Tensor, y_groups: torch.Tensor, w_sum: torch.Tensor,
                          w_abs_sum: torch.Tensor, b_sum: torch.Tensor | None = None,
                          b_abs_sum: torch.Tensor | None = None, *, group_size: int,
                          scale: float | torch.Tensor | None = None,
                          out_dtype: torch.dtype | None = None,
                          input_u: float | None = None,
                          accum_u: float | None = None) -> torch.Tensor:
    """ABFT for ``y = scale * (x @ W + b)`` checked through per-group sums of y.

    ``x[..., K]``: the layer input. ``y_groups[..., G]``: for each group g (head) the sum of
    that group's ``group_size`` output columns of the y that downstream ops consume. Sum it
    after upcasting (``q_heads.to(torch.float64).sum(-1)``): its dtype is taken as the
    precision of that sum, and a bf16 sum costs gamma_{group_size}(2^-8).
    ``w_sum[K, G]``/``w_abs_sum[K, G]``: W's (or |W|'s) columns summed per group, once, in
    float64, with W as ``[K, N]`` (see ``linear_group_sums``); ``b_sum[G]``/``b_abs_sum[G]``:
    the same for the bias (None: no bias). ``scale``: a constant the model multiplies y by
    before the heads are split (OPT's ``q_proj(x) * scaling``; float or 0-dim tensor, as in
    ``matmul_checksum_score``); None for no multiplication.
    ``out_dtype``: the dtype y was rounded to (default ``x.dtype``; pass it under autocast).
    ``input_u``/``accum_u`` as in ``matmul_checksum_score`` (default: exact operands, or
    autocast's rounding of x and W when x is finer than ``out_dtype``; W is assumed stored no
    finer than x). Returns a score of shape ``y_groups.shape`` (one per token and head).

    Tolerance, with Q_g >= sum_l |x_l| w_abs_sum[l, g] + b_abs_sum[g] (= sum over the group of
    |x||W| + |b|; an upper bound from ``upper_matmul``) and r roundings at u_out or finer (GEMM
    result, bias add, and for a scale its opmath conversion, a reciprocal if the model divides,
    the product: r = 1 + [bias] + 3 [scale]):
      per column:  |y_c - s(xW + b)_c| <= |s| rho (P_c + |b_c|),
                   rho = rel_{K+1} + gamma_r(u_out) (1 + rel_{K+1})   (rel_k as in the matmul
                   check; K+1 for the bias added in the accumulator);
      group sum by the caller in y_groups' dtype: gamma_gs(u_yg) (1 + rho) |s| Q_g;
      prediction s (x . w_sum + b_sum) in float64 (w_sum exact to u_c): gamma_{K+gs+4}(u_c) |s| Q_g,
               plus |s| E for a float32 x, whose dot products run in float32 chunks
               (``linear_checksum_terms``);
      underflow: gs (1 + |s|) ((K+1) tiny_acc + r eta_out + tiny_yg);
      tol = (|s| (rho + gamma_gs(u_yg)(1 + rho) + gamma_{K+gs+4}(u_c)) Q_g + underflow) * slack.
    """
    terms = linear_checksum_terms(x, w_sum, w_abs_sum, b_sum, b_abs_sum)
    return linear_checksum_verdict(terms, y_groups, in_features=x.shape[-1], in_dtype=x.dtype,
                                   has_bias=b_sum is not None, group_size=group_size,
                                   scale=scale, out_dtype=out_dtype, input_u=input_u,
                                   accum_u=accum_u)


def linear_checksum_terms(x: torch.Tensor, w_sum: torch.Tensor, w_abs_sum: torch.Tensor,
                          b_sum: torch.Tensor | None = None,
                          b_abs_sum: torch.Tensor | None = None) -> torch.Tensor:
    """The GEMM half of ``linear_checksum_score``: ``[x . w_sum + b_sum, Q, E]`` stacked on a
    new leading dim, float64, shape ``[3, *x.shape[:-1], G]``: the prediction before the scale,
    an upper bound Q >= |x| . w_abs_sum + b_abs_sum, and a bound E on the prediction's error
    beyond a float64 evaluation. Checks that read the same x (a layer's q, k and v
    projections) share one call with their group sums concatenated along G. Q only scales the
    tolerance, so it comes from a GEMM in the element dtype (``upper_matmul``), which on CPUs
    runs at twice the rate and needs no float64 copy of x (measured with the float32 per-head
    sums of ``runtime.projection_checksum_score``: the ABFT cost of one GPT-2 layer, CPU
    float32 4 x 256, 26 -> 17 ms in paired runs).

    The prediction of a float32 x comes from float32 dot products of ``_DOT_CHUNK`` terms, one
    per chunk of x's row (one batched GEMM over the chunks, x read in place), added in
    float64 (``_chunked_terms``): no float64 copy of x and no float64 GEMM, which took
    1 ms of a GPT-2 layer's checks (CPU, 4 x 256). This GEMM runs under the same assumption as
    the checked layer's own float32 GEMM (IEEE float32 operands, see ``default_gemm_roundoff``).
    Other inputs keep a float64 GEMM (E = 0): a 16-bit model's GEMMs do not depend on the
    float32 matmul precision flags, so its check must not either."""
    rows = x.reshape(-1, x.shape[-1])
    if x.dtype == torch.float32 and rows.shape[-1] % _DOT_CHUNK == 0:
        pred, q_abs, error = _chunked_terms(rows, w_sum, w_abs_sum)
    else:
        pred = rows.to(CHECK_DTYPE) @ w_sum.to(CHECK_DTYPE)
        q_abs = upper_matmul(rows.abs(), w_abs_sum)
        error = torch.zeros_like(pred)
    if b_sum is not None:
        pred = pred + b_sum.to(CHECK_DTYPE)
        q_abs = q_abs + b_abs_sum.to(CHECK_DTYPE)
    return torch.stack([pred, q_abs, error]).reshape(3, *x.shape[:-1], w_sum.shape[-1])


_DOT_CHUNK = 64


def _chunked_terms(rows: torch.Tensor, w_sum: torch.Tensor, w_abs_sum: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rows @ w_sum, Q, E)`` for float32 ``rows[M, K]`` (K a multiple of ``_DOT_CHUNK``) and
    float64 ``w_sum[K, G]``, ``w_abs_sum``, without the bias (``linear_checksum_terms``).

    w_sum is rounded to float32, w_e, with r = max_lg |w_sum - w_e| / w_abs_sum measured here
    (``_rounded_sums``, as ``row_sum_weights`` does for the output projection; at most 2^-24
    unless w_sum is subnormal in float32), so |x . (w_sum - w_e)| <= r Q. Each
    chunk's float32 dot of c = ``_DOT_CHUNK`` exact products, accumulated in any order by a
    possibly truncating accumulator, errs by at most rel_c = gamma_c(2 u) (``_gemm_rel``, as
    ``_ACC_FACTOR``) times the sum of its terms' magnitudes, plus c tiny for products and
    partial sums flushed to zero; the n = K / c chunk sums are converted exactly and added in
    float64 (gamma_n(2^-53) of their magnitudes, at most (1 + rel_c) P). So, with
    P >= sum_l |x_l| |w_e_l| from the same GEMM as Q (``upper_matmul``, G more columns):
        E = (rel_c + gamma_n(2^-53) (1 + rel_c)) P + r Q + 2 K tiny.
    rel_c = gamma_64(2^-23) = 7.6e-6 against the projection check's own ~gamma_K(2^-23) Q
    (9.2e-5 Q at GPT-2's K = 768); P is Q's sum over the group's summed columns, which
    cancel where the weights' signs vary: for random signs about Q / sqrt(group size)."""
    m, k = rows.shape
    groups = w_sum.shape[-1]
    chunks = k // _DOT_CHUNK
    w_e, ratio = _rounded_sums(w_sum, w_abs_sum, torch.float32)
    parts = torch.bmm(rows.reshape(m, chunks, _DOT_CHUNK).transpose(0, 1),
                      w_e.reshape(chunks, _DOT_CHUNK, groups))
    pred = parts.to(CHECK_DTYPE).sum(0)
    q_abs, p_abs = upper_matmul(rows.abs(), torch.cat([w_abs_sum.to(CHECK_DTYPE),
                                                       w_e.abs().to(CHECK_DTYPE)], -1)
                                ).split(groups, -1)
    rel_c = _gemm_rel(_DOT_CHUNK, 0.0, _ACC_FACTOR * unit_roundoff(torch.float32))
    p_rel = rel_c + gamma(chunks, U_CHECK) * (1 + rel_c)
    error = ((p_rel * p_abs + ratio * q_abs) * _slack(4)
             + 2 * k * torch.finfo(torch.float32).tiny)
    return pred, q_abs, error


# A bfloat16 GEMM runs in hardware on CPUs with AMX tiles (torch's oneDNN path): read once, at
# import, as the traced checks must not call into the runtime for it.
_CPU_BF16_GEMM = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def magnitude_gemm_dtype(a: torch.Tensor) -> torch.dtype:
    """The dtype of ``upper_matmul``'s GEMM for ``a``: float64 for float64 a; bfloat16 on CPUs
    with AMX (GPT-2 small's q/k/v magnitudes, [1024, 768] @ [768, 72] compiled, one thread,
    Xeon: 0.49 ms against 1.11 ms in float32); else float32."""
    if a.dtype == torch.float64:
        return torch.float64
    return torch.bfloat16 if a.device.type == "cpu" and _CPU_BF16_GEMM else torch.float32


def upper_matmul(a: torch.Tensor, b: torch.Tensor,
                 gemm_dtype: torch.dtype | None = None) -> torch.Tensor:
    """An upper bound, in float64, on ``a @ b`` for non-negative ``a[M, K]`` (any float dtype)
    and ``b[K, N]`` (float64), from a GEMM in ``gemm_dtype`` (default
    ``magnitude_gemm_dtype(a)``).

    The computed product is at least the exact one times a factor ``low`` minus K tiny, whatever
    the backend does. float32/float64 GEMMs: low = (1 - d_in)^2 (1 - u) (1 - gamma_K(2u)): b's
    rounding to the GEMM's dtype (u); each operand's rounding inside the GEMM, d_in = 2^-7 for
    float32 GEMMs (torch's coarsest float32 matmul precision rounds operands to bfloat16, by
    truncation at worst; TF32 is finer) and 0 for float64; K non-negative products accumulated
    in any order by a possibly truncating accumulator (gamma_K(2u), as ``_ACC_FACTOR``).
    bfloat16 GEMMs (u = 2^-8): a and the result rounded to nearest (u each), b rounded through
    float32 (2u), products exact and accumulated in float32 (gamma_K(2^-23)): low =
    (1 - u)^2 (1 - 2u) (1 - gamma_K(2^-23)), a bound some 1.6 % above the product. Near
    underflow: b is raised to at least the dtype's smallest normal ``tiny`` (so its rounding
    stays relative), a flushed subnormal a_l loses under tiny * b_l, and a product or a result
    that underflows loses under tiny. So (computed + K tiny (1 + max b)) / low bounds the exact
    product; the factor also carries 2^-50 for the float64 roundings of this correction.
    """
    dtype = gemm_dtype or magnitude_gemm_dtype(a)
    u = unit_roundoff(dtype)
    tiny = torch.finfo(dtype).tiny
    k = a.shape[-1]
    if dtype == torch.bfloat16:
        accumulation = gamma(k, _ACC_FACTOR * unit_roundoff(torch.float32))
        low = (1 - u) ** 2 * (1 - 2 * u) * (1 - accumulation)
        b = b.to(torch.float32)
    else:
        d_in = 2.0 ** -7 if dtype == torch.float32 else 0.0
        low = (1 - d_in) ** 2 * (1 - u) * (1 - gamma(k, _ACC_FACTOR * u))
    grow = (1 + 2.0 ** -50) / low if low > 0 else math.inf
    product = (a.to(dtype) @ b.to(dtype).clamp(min=tiny)).to(CHECK_DTYPE)
    return (product + k * tiny * (1 + b.amax().to(CHECK_DTYPE))) * grow


def linear_checksum_verdict(terms: torch.Tensor, y_groups: torch.Tensor, *, in_features: int,
                            in_dtype: torch.dtype, has_bias: bool, group_size: int,
                            scale: float | torch.Tensor | None = None,
                            out_dtype: torch.dtype | None = None, input_u: float | None = None,
                            accum_u: float | None = None,
                            group_sum_error: tuple[float, float] | None = None,
                            prediction_error: tuple[float | torch.Tensor, float] = (0.0, 0.0)
                            ) -> torch.Tensor:
    """The comparison half of ``linear_checksum_score``: ``terms`` from
    ``linear_checksum_terms`` (shaped like ``y_groups`` after its leading 3; a third row bounds
    the prediction's error and is added to the tolerance) or ``row_checksum_terms`` (2), the layer input's
    width and dtype, whether the layer has a bias; the other arguments and the tolerance as in
    ``linear_checksum_score``. ``group_sum_error``: (relative, per-element absolute) error of
    ``y_groups`` as sums of the group's y (default: summed whole in y_groups' dtype,
    (gamma_gs(u_yg), tiny_yg)); ``prediction_error``: (relative to Q, absolute) error of
    ``terms[0]`` beyond its float64 evaluation (``row_checksum_terms``)."""
    k_in = in_features
    out_dtype = in_dtype if out_dtype is None else out_dtype
    d_input_u, d_accum_u = default_gemm_roundoff(out_dtype, in_dtype)
    g_acc = _gemm_rel(k_in + 1, d_input_u if input_u is None else input_u,
                      d_accum_u if accum_u is None else accum_u)
    tiny_acc = torch.finfo(torch.float64 if out_dtype == torch.float64 else torch.float32).tiny
    u_out = unit_roundoff(out_dtype)
    sum_rel, sum_tiny = group_sum_error or (gamma(group_size, unit_roundoff(y_groups.dtype)),
                                            torch.finfo(y_groups.dtype).tiny)
    pred_rel, pred_abs = prediction_error
    s, s_abs = _scale_parts(scale, terms.device)
    r = 1 + int(has_bias) + (3 if scale is not None else 0)
    rho = g_acc + gamma(r, u_out) * (1 + g_acc)
    rel = s_abs * (rho + sum_rel * (1 + rho) + gamma(k_in + group_size + 4, U_CHECK) + pred_rel)
    absolute = group_size * (s_abs + 1) * (
        (k_in + 1) * tiny_acc + r * _out_eta(out_dtype) + sum_tiny) + s_abs * pred_abs + _TINY_CHECK

    pred, q_abs = terms[0] * s, terms[1]
    if terms.shape[0] > 2:  # the prediction's own error bound (linear_checksum_terms)
        absolute = absolute + s_abs * terms[2]
    yg = y_groups.to(CHECK_DTYPE)
    tol = (rel * q_abs + absolute) * _slack(k_in + group_size + 8)
    nonfinite = ~(torch.isfinite(yg) & torch.isfinite(pred))
    return _finish((yg - pred).abs(), tol, nonfinite)


def blocked_sum_error(length: int, dtype: torch.dtype) -> tuple[float, float]:
    """(relative, per-term absolute) error of ``_sum_in_blocks`` over ``length`` terms in ``dtype``,
    relative to the sum of the terms' magnitudes: each term passes through at most b - 1
    additions in its partial sum and _LANES - 1 in its lane sum, in any order, so
    gamma_{b-1}(u) + gamma_{_LANES-1}(u) (1 + gamma_{b-1}(u)) <= gamma_{b + _LANES - 2}(u)
    (Higham's Lemma 3.3), then gamma_{nb / _LANES}(2^-53) for the float64 additions of the lane
    sums (exact conversions; (b, nb) = ``_block_shape(length)``); and ``tiny`` per term for
    partial and lane sums flushed to zero (fewer additions than terms)."""
    block, blocks = _block_shape(length)
    return (gamma(block + _LANES - 2, unit_roundoff(dtype)) + gamma(blocks // _LANES, U_CHECK),
            torch.finfo(dtype).tiny)


def _blocked_dot_error(length: int, dtype: torch.dtype) -> float:
    """Relative error, against sum_l |x_l y_l| (+ |b|), of a dot product of ``length`` terms
    computed as products rounded to ``dtype`` summed by ``_sum_in_blocks``, plus one float64
    addition (a bias): u + g (1 + u) for the products and the sum (g from
    ``blocked_sum_error``), then gamma_1(2^-53)."""
    u = unit_roundoff(dtype)
    g = blocked_sum_error(length, dtype)[0]
    return u + g * (1 + u) + gamma(1, U_CHECK)


def row_sum_weights(w_sum: torch.Tensor, w_abs_sum: torch.Tensor, dtype: torch.dtype
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Host-side: a layer's ``w_sum[K]`` and ``w_abs_sum[K]`` (float64, W's rows summed over
    every output column, see ``linear_group_sums``) in ``element_dtype(dtype)`` for
    ``row_checksum_terms``: ``w_e`` rounded to nearest, ``wa_e`` rounded up (so sums of |x| wa_e
    bound sums of |x| w_abs_sum from above), and ``r = max_l |w_sum_l - w_e_l| / w_abs_sum_l``
    (0 where both are 0; |w_sum_l| <= w_abs_sum_l), so that |x . (w_sum - w_e)| <= r Q with
    Q = sum_l |x_l| w_abs_sum_l. r (a float64 0-dim tensor, kept as a buffer: it depends on the
    weights) is about 2^-24 for float32; it is measured, not assumed, so sums near float32's
    underflow are covered too."""
    elem = element_dtype(dtype)
    w_e, ratio = _rounded_sums(w_sum, w_abs_sum, elem)
    wa_e = w_abs_sum.to(elem)
    wa_e = torch.where(wa_e.to(torch.float64) < w_abs_sum,
                       torch.nextafter(wa_e, torch.full_like(wa_e, math.inf)), wa_e)
    return w_e, wa_e, ratio


def _rounded_sums(w_sum: torch.Tensor, w_abs_sum: torch.Tensor, dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_e, r): float64 ``w_sum`` rounded to nearest in ``dtype``, and
    r = max |w_sum - w_e| / w_abs_sum (a float64 0-dim tensor; 0 where both are 0, as
    |w_sum| <= w_abs_sum), so that |x . (w_sum - w_e)| <= r sum |x| w_abs_sum."""
    w_e = w_sum.to(dtype)
    diff = (w_sum.to(CHECK_DTYPE) - w_e.to(CHECK_DTYPE)).abs()
    zero = torch.zeros((), dtype=CHECK_DTYPE, device=diff.device)
    ratio = torch.where(diff > 0, diff / w_abs_sum.to(CHECK_DTYPE), zero)
    return w_e, ratio.amax() if ratio.numel() else zero


def row_checksum_terms(x: torch.Tensor, w_e: torch.Tensor, wa_e: torch.Tensor,
                       b_sum: torch.Tensor | None = None,
                       b_abs_sum: torch.Tensor | None = None) -> torch.Tensor:
    """``linear_checksum_terms`` for one group (all output columns: a full row checksum) from
    products in the element dtype e summed in blocks (``_sum_in_blocks``), which inductor fuses
    into the pass that produces x: no matrix-vector products and no float64 copy of x (measured
    on GPT-2's output projection, [4, 256, 768] float32, compiled, the whole check: 1.66 ms with
    the float64 GEMV and float64 row sums of y, 0.62 ms in blocks).

    ``w_e[K]``, ``wa_e[K]`` from ``row_sum_weights``; ``b_sum``/``b_abs_sum``: float64 scalars
    (shape [1]) or None. Returns ``[prediction, Q]`` as ``linear_checksum_terms`` does, shape
    ``[2, *x.shape[:-1], 1]``. The prediction x . w_e + b errs by at most
    r_K (sum_l |x_l w_e_l| + |b|) + 2 K tiny_e, r_K = ``_blocked_dot_error(K, e)`` (each
    product's rounding, the blocked sum, the float64 addition of b; products and partial sums
    flushed to zero); ``prediction_error`` turns that into terms of Q (see
    ``output_checksum_score``). Q: the computed sum of the non-negative products |x_l| wa_e_l is
    at least (1 - r_K) times the exact one, less 2 K tiny_e, and wa_e >= w_abs_sum, so
    Q <= (Q_hat + 2 K tiny_e) / (1 - r_K).
    """
    elem = element_dtype(x.dtype)
    u, tiny = unit_roundoff(elem), torch.finfo(elem).tiny
    k = x.shape[-1]
    x_e = x.to(elem)
    pred = _sum_in_blocks(x_e * w_e.to(elem))
    q_hat = _sum_in_blocks(x_e.abs() * wa_e.to(elem))
    if b_sum is not None:
        pred = pred + b_sum.to(CHECK_DTYPE)
        q_hat = q_hat + b_abs_sum.to(CHECK_DTYPE)
    low = 1 - _blocked_dot_error(k, elem)
    q_bound = (q_hat + 2 * k * tiny) * ((1 + 2.0 ** -50) / low)  # 2^-50: these float64 steps
    return torch.stack([pred, q_bound]).unsqueeze(-1)


def row_checksum_error(in_features: int, in_dtype: torch.dtype, weight_rounding: torch.Tensor
                       ) -> tuple[torch.Tensor, float]:
    """``prediction_error`` for ``linear_checksum_verdict`` of terms from ``row_checksum_terms``:
    with r = ``weight_rounding`` (``row_sum_weights``), sum_l |x_l w_e_l| + |b| <= (1 + r) Q, so
    the prediction errs from x . w_sum + b by at most (r_K (1 + r) + r) Q + 2 K tiny_e,
    r_K = ``_blocked_dot_error(K, e)``."""
    elem = element_dtype(in_dtype)
    rounding = _blocked_dot_error(in_features, elem)
    tiny = torch.finfo(elem).tiny
    return rounding * (1 + weight_rounding) + weight_rounding, 2 * in_features * tiny


def linear_group_sums(weight: torch.Tensor, bias: torch.Tensor | None,
                      groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                            torch.Tensor | None]:
    """Host-side precomputation for ``linear_checksum_score`` from an ``nn.Linear``'s parameters.

    ``weight[N, K]`` (nn.Linear layout; pass ``conv1d.weight.T`` for GPT-2's Conv1D), ``bias[N]``,
    N split into ``groups`` contiguous groups. Returns float64 ``(w_sum[K, G], w_abs_sum[K, G],
    b_sum[G], b_abs_sum[G])`` (bias entries None without bias); register them as buffers.
    """
    n_out, k_in = weight.shape
    if n_out % groups:
        raise ValueError(f"{n_out} output columns do not split into {groups} groups")
    w = weight.detach().to(torch.float64).reshape(groups, n_out // groups, k_in)
    w_sum, w_abs_sum = w.sum(1).T.contiguous(), w.abs().sum(1).T.contiguous()
    if bias is None:
        return w_sum, w_abs_sum, None, None
    b = bias.detach().to(torch.float64).reshape(groups, n_out // groups)
    return w_sum, w_abs_sum, b.sum(1), b.abs().sum(1)
