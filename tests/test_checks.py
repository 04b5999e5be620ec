"""Runtime checks: zero flags on clean inputs (property tests), detection of bit-30 flips, compile."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fxsdc import checks, runtime
from fxsdc.bounds import lambertw_table

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """These tensors are tiny: one thread is faster and immune to a CPU shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def flip_bit(t: torch.Tensor, index: tuple[int, ...], bit: int) -> torch.Tensor:
    """Copy of ``t`` with one bit of one element flipped (float32 -> int32, 16-bit -> int16 view)."""
    int_dtype = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
                 torch.float64: torch.int64}[t.dtype]
    out = t.clone()
    bits = out.view(int_dtype)
    bits[index] = bits[index] ^ torch.tensor(1 << bit, dtype=torch.int64).to(int_dtype)
    return out


# ------------------------------------------------------------------ clean softmax rows


def make_logits(kind: str, rows: int, length: int, scale: float, gen: torch.Generator) -> torch.Tensor:
    """float64 logits within [-50, 50]: random, or adversarial rows that make the bounds tight."""
    if kind == "normal":
        x = torch.randn(rows, length, generator=gen, dtype=torch.float64) * scale
    elif kind == "uniform":
        x = (torch.rand(rows, length, generator=gen, dtype=torch.float64) * 2 - 1) * scale
    elif kind == "tau_tight":  # one max, the rest equal at a* - gamma: eps = tau (and = middle)
        w_n = lambertw_table(length)[length].item()
        gam = 1 + w_n + torch.rand(rows, 1, generator=gen, dtype=torch.float64) * scale / 10
        x = (scale - gam).expand(rows, length).clone()
        x[:, 0] = scale
    elif kind == "ties":  # all equal, or two equal maxima far above the rest
        x = torch.full((rows, length), float(scale), dtype=torch.float64)
        x[1::2, 2:] = -scale
    else:  # "outlier": one huge logit, the rest spread
        x = torch.randn(rows, length, generator=gen, dtype=torch.float64)
        x[:, length // 2] = scale
    return x.clamp(-50, 50)


def apply_mask(x: torch.Tensor, how: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask the way models do; returns (masked logits, valid mask). Every row keeps >= 1 key."""
    rows, length = x.shape
    if how == "none":
        return x, torch.ones_like(x, dtype=torch.bool)
    if how == "causal":  # query i of the last `rows` positions sees keys <= length - rows + i
        valid = torch.ones(rows, length, dtype=torch.bool).tril(diagonal=length - rows)
    else:  # padding: a random number of trailing keys masked
        keep = torch.randint(1, length + 1, (rows, 1), generator=gen)
        valid = torch.arange(length).expand(rows, length) < keep
    low = torch.finfo(x.dtype).min
    if how == "additive":  # BERT-style: x + (1 - mask) * finfo.min
        return x + (~valid).to(x.dtype) * low, valid
    if how == "neginf":
        return x.masked_fill(~valid, -math.inf), valid
    return torch.where(valid, x, torch.full((), low, dtype=x.dtype)), valid


softmax_cases = st.fixed_dictionaries({
    "dtype": st.sampled_from(DTYPES),
    "rows": st.integers(1, 6),
    "length": st.integers(1, 96),
    "scale": st.sampled_from([0.01, 1.0, 5.0, 20.0, 50.0]),
    "kind": st.sampled_from(["normal", "uniform", "tau_tight", "ties", "outlier"]),
    "mask": st.sampled_from(["none", "causal", "padding", "additive", "neginf"]),
    "upcast": st.booleans(),  # Llama: softmax(x, dtype=float32).to(dtype)
    "seed": st.integers(0, 2**31 - 1),
})


@SETTINGS
@given(case=softmax_cases)
def test_softmax_checks_clean_rows_never_flag(case: dict) -> None:
    gen = torch.Generator().manual_seed(case["seed"])
    dtype = case["dtype"]
    rows = max(case["rows"], 2) if case["mask"] == "causal" else case["rows"]
    length = max(case["length"], rows)
    x = make_logits(case["kind"], rows, length, case["scale"], gen).to(dtype)
    logits, valid = apply_mask(x, case["mask"], gen)
    if case["upcast"] and dtype != torch.float64:
        weights = torch.softmax(logits, -1, dtype=torch.float32).to(dtype)
    else:
        weights = torch.softmax(logits, -1)
    table = lambertw_table(length)
    bounds = checks.softmax_bounds_score(logits, weights, table)
    sums = checks.softmax_sum_score(weights, logits)
    assert bounds.shape == sums.shape == (rows,)
    assert torch.isfinite(bounds).all() and torch.isfinite(sums).all()
    assert bounds.max() <= 1, f"bounds score {bounds.max().item()} on clean rows ({case})"
    assert sums.max() <= 1, f"sum score {sums.max().item()} on clean rows ({case})"
    assert (bounds[valid.sum(-1) < 2] == 0).all()  # n < 2: not checkable
    # the same rows with only an explicit mask give the same verdict
    assert (checks.softmax_bounds_score(logits, weights, table, valid) <= 1).all()


def test_softmax_nonfinite_and_uncheckable_rows() -> None:
    x = torch.randn(4, 8)
    x[1, 3] = math.nan
    x[2, 1:] = -math.inf  # n = 1: not checkable
    x[3, :] = torch.finfo(torch.float32).min  # fully masked (uniform weights): not checkable
    w = torch.softmax(x, -1)
    bounds = checks.softmax_bounds_score(x, w, lambertw_table(8))
    sums = checks.softmax_sum_score(w, x)
    assert bounds[0] <= 1 and bounds[2] == 0 and bounds[3] == 0 and bounds[1] == math.inf
    assert sums[0] <= 1 and sums[1] == math.inf and sums[2] <= 1 and sums[3] == 0
    with pytest.raises(ValueError, match="lambertw_table"):
        checks.softmax_bounds_score(x, w, lambertw_table(4))


def test_softmax_checks_find_nonfinite_inputs_from_row_sums() -> None:
    """The runtime checks find non-finite values through row sums, not per-element tests: each
    kind of non-finite input still makes its row's score +inf, wherever it sits."""
    x = torch.randn(5, 8)
    w = torch.softmax(x, -1)
    x[0, 2] = math.inf  # a +Inf valid logit (weights left finite)
    w[1, 3] = math.nan
    x[2, 7] = torch.finfo(torch.float32).min  # a masked key ...
    w[2, 7] = math.inf  # ... whose weight is +Inf
    w[3, 0] = -w[3, 0]  # finite but negative: a range violation, not a non-finite row
    bounds = checks.softmax_bounds_score(x, w, lambertw_table(8))
    sums = checks.softmax_sum_score(w, x)
    assert bounds[:3].tolist() == [math.inf] * 3 and sums[1:3].tolist() == [math.inf] * 2
    assert math.isfinite(sums[3]) and sums[3] > 1 and sums[4] <= 1 and bounds[4] <= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_softmax_sum_check_holds_weights_in_range_through_two_sums(dtype: torch.dtype) -> None:
    """Rows that sum to 1 but hold a weight outside [0, 1] fail through the sum of |w|; a
    weight off by ~2 tolerances fails, one inside half a tolerance passes."""
    length = 16
    tol = checks.softmax_sum_tolerance(dtype, length)
    logits = torch.zeros(4, length, dtype=dtype)
    w = torch.zeros(4, length, dtype=torch.float64)
    w[0, :2] = torch.tensor([1.5, -0.5])  # sums to 1 exactly; |w| sums to 2
    w[1, :2] = torch.tensor([1.0 + 4 * tol, -4 * tol])
    w[2, :2] = torch.tensor([0.5, 0.5])
    w[3, :2] = torch.tensor([1.0 + tol / 4, -tol / 4])
    w = w.to(dtype)
    assert w[0].double().sum() == 1  # the plain sum alone would pass row 0
    score = checks.softmax_sum_score(w, logits)
    assert score[0] > 1 and score[1] > 1, score
    assert score[2] <= 1 and score[3] <= 1, score


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("scale", [1e-40, 1e-3, 1.0, 1e20])
@pytest.mark.parametrize("gemm", [None, torch.float32, torch.bfloat16])
def test_upper_matmul_bounds_the_exact_product(dtype: torch.dtype, scale: float,
                                               gemm: torch.dtype | None) -> None:
    """``upper_matmul`` (the magnitude Q of the projection checksums) is never below the exact
    product, and at most a few per cent above it, from a GEMM in the dtype this machine picks
    (``magnitude_gemm_dtype``) and in float32 and bfloat16 whatever the machine."""
    gen = torch.Generator().manual_seed(7)
    k = 768
    a = (torch.rand(64, k, generator=gen, dtype=torch.float64) * scale).to(dtype)
    b = torch.rand(k, 36, generator=gen, dtype=torch.float64) * 40
    b[::7] = 1e-45  # below float32's smallest normal
    exact = a.double() @ b  # float64: within gamma_K(2^-53) of the exact product
    if dtype == torch.float64 and gemm is not None:
        gemm = torch.float64  # a float64 operand keeps a float64 GEMM
    upper = checks.upper_matmul(a.abs(), b, gemm)
    assert (upper >= exact / (1 - checks.gamma(k, 2.0**-53))).all()
    tiny = k * torch.finfo(checks.element_dtype(dtype)).tiny * (1 + 40)
    assert (upper <= exact * 1.02 + 2 * tiny).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1e-40, 1.0, 1e30])
@pytest.mark.parametrize("m", [256, 16])  # k = 64 <= m, and k > m (A.(B.1) in float32)
def test_checksum_magnitudes_bound_the_exact_sums(dtype: torch.dtype, scale: float, m: int) -> None:
    """The magnitudes that scale the matmul checksum's tolerance, summed in float32, are never
    below the exact sum_j |c_ij|, sum_l |a_il| sum_j |b_lj| and sum_l |a_il| (float64
    references, exact to far below float32's rounding; float64 inputs would need an exact
    reference)."""
    gen = torch.Generator().manual_seed(3)
    a = (torch.randn(2, 3, 40, 64, generator=gen, dtype=torch.float64) * scale).to(dtype)
    b = (torch.randn(2, 3, 64, m, generator=gen, dtype=torch.float64) * scale).to(dtype)
    c = (a.double() @ b.double()).to(dtype)
    b_abs_sums = checks._row_sums(b.to(checks.element_dtype(dtype)))[1]  # as the check sums
    c_abs, q_abs, a_abs = checks._checksum_magnitudes(a, c, b_abs_sums)
    # The float64 references are at least (1 - gamma_n(2^-53)) times the exact sums of their n
    # roundings (m terms; m + k for the sums of products; k), so reference / that bounds each
    # exact sum from above. (With m = 16, C's partial sums hold one term each and are exact.)
    def slack(n: int) -> float:
        return 1 / (1 - checks.gamma(n, 2.0**-53))
    k = a.shape[-1]
    assert (c_abs >= c.double().abs().sum(-1) * slack(m)).all()
    assert (q_abs >= (a.double().abs() * b.double().abs().sum(-1).unsqueeze(-2)).sum(-1)
            * slack(m + k)).all()
    assert (a_abs is None) == (m > 64)
    if a_abs is not None:
        assert (a_abs >= a.double().abs().sum(-1) * slack(k)).all()


# ------------------------------------------------------------------ clean matmuls

SCALES = {
    torch.float64: [1e-150, 1e-20, 1.0, 1e20, 1e150],
    torch.float32: [1e-20, 1e-3, 1.0, 1e3, 1e15],
    torch.bfloat16: [1e-20, 1e-3, 1.0, 1e3, 1e15],
    torch.float16: [1e-3, 0.1, 1.0, 8.0],
}


def make_operand(shape: tuple[int, ...], dist: str, scale: float, gen: torch.Generator) -> torch.Tensor:
    if dist == "normal":
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
    elif dist == "positive":  # no cancellation: the bound is nearly attained in sign
        x = torch.rand(shape, generator=gen, dtype=torch.float64)
    else:  # "spread": magnitudes over 6 decades, random signs, some exact zeros
        x = torch.randn(shape, generator=gen, dtype=torch.float64).sign() * 10 ** (
            6 * torch.rand(shape, generator=gen, dtype=torch.float64) - 3)
        x = x * (torch.rand(shape, generator=gen) > 0.1)
    return x * scale


matmul_cases = st.fixed_dictionaries({
    "dtype": st.sampled_from(DTYPES),
    "batch": st.sampled_from([(), (2,), (2, 3)]),
    "broadcast_b": st.booleans(),
    "n": st.integers(1, 12), "k": st.integers(1, 80),
    # rows of C: short ones (partial sums of one or two terms), and 64, 100, 256 (of 4, 7, 16)
    "m": st.one_of(st.integers(1, 24), st.sampled_from([64, 100, 256])),
    "dist": st.sampled_from(["normal", "positive", "spread"]),
    "sa": st.integers(0, 4), "sb": st.integers(0, 4),
    # how the model scales the product: GPT-2 divides by a torch.full divisor in the dtype
    "scale": st.sampled_from([None, ("mul", 0.125), ("mul", -3.0), ("mul", 1 / math.sqrt(48)),
                              ("div_tensor", math.sqrt(48)), ("div_float", math.sqrt(80))]),
    "seed": st.integers(0, 2**31 - 1),
})


def scaled_product(a: torch.Tensor, b: torch.Tensor, how: tuple[str, float] | None):
    """(c as the model computes it, the scale to pass to matmul_checksum_score)."""
    c = torch.matmul(a, b)
    if how is None:
        return c, None
    kind, value = how
    if kind == "mul":
        return c * value, value
    if kind == "div_float":
        return c / value, 1.0 / value
    divisor = torch.full([], value, dtype=c.dtype)
    return c / divisor, 1.0 / divisor.to(torch.float64)


def test_blocked_sums_use_short_partials_sixteen_wide() -> None:
    """``_sum_in_blocks`` splits a row into a multiple of 16 partial sums (inductor's C++ loop
    over them then runs 16 floats wide, see ``checks._block_shape``) of at most 16 terms, each
    as short as that allows; the blocks cover the row, and the sum is the row's."""
    for length in range(0, 2100):
        block, blocks = checks._block_shape(length)
        assert blocks % 16 == 0 and 1 <= block <= 16 and block * blocks >= length
        assert blocks == 16 or (blocks - 16) * 16 < length  # no more partials than needed
        assert block == 1 or (block - 1) * blocks < length  # and none longer
    gen = torch.Generator().manual_seed(0)
    for length in (1, 64, 100, 257, 768):
        x = torch.randint(-1000, 1000, (3, length), generator=gen).to(torch.float64)
        assert torch.equal(checks._sum_in_blocks(x), x.sum(-1))  # integers: exact either way


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1e-40, 1.0, 1e30])
def test_blocked_sums_bound_their_errors(dtype: torch.dtype, scale: float) -> None:
    """``_sum_in_blocks`` (partials, their lanes in the element dtype, float64 beyond) is within
    ``blocked_sum_error`` of the exact row sum, relative to the sum of magnitudes, at any
    magnitude (subnormal terms and sums at 1e-40) and for rows of one to several lane groups;
    float64 references (exact to ~1e-13 relative, far below the bounds' ~1e-6)."""
    gen = torch.Generator().manual_seed(13)
    for length in (1, 7, 64, 100, 256, 257, 768, 1024):
        x = torch.randn(50, length, generator=gen, dtype=torch.float64)
        x = x * torch.logspace(-3, 3, length, dtype=torch.float64)[torch.randperm(length,
                                                                                 generator=gen)]
        x = (x * scale).to(dtype).to(torch.float32)
        exact = x.double().sum(-1)
        rel, tiny = checks.blocked_sum_error(length, torch.float32)
        bound = rel * x.double().abs().sum(-1) * (1 + 1e-12) + length * tiny
        assert ((checks._sum_in_blocks(x) - exact).abs() <= bound).all(), length


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1e-40, 1e-20, 1.0, 1e15])
def test_short_side_dot_bounds_its_error(dtype: torch.dtype, scale: float) -> None:
    """A.(B.1) for the q.k^T checksum (B the long side): B.1 in float64 rounded to float32, the
    products summed in blocks over the short k, is within its bound E of the float64
    A.(B.1)^ (``_dot_with_row_sums``), at any magnitude: subnormal products and flushed sums at
    1e-40 and 1e-20 (products of two 1e-20 values), against float64 references over k terms."""
    gen = torch.Generator().manual_seed(17)
    for k, m in ((64, 256), (7, 40), (100, 100)):
        a = (torch.randn(2, 3, 30, k, generator=gen, dtype=torch.float64) * scale).to(dtype)
        b = (torch.randn(2, 3, k, m, generator=gen, dtype=torch.float64) * scale).to(dtype)
        dot, error = checks._dot_with_row_sums(a.to(torch.float32), b)
        exact = (a.double() * b.double().sum(-1).unsqueeze(-2)).sum(-1)
        assert dot.shape == error.shape == a.shape[:-1]
        assert ((dot - exact).abs() <= error).all(), (k, m)


@SETTINGS
@given(case=matmul_cases)
def test_matmul_checksum_clean_never_flags(case: dict) -> None:
    gen = torch.Generator().manual_seed(case["seed"])
    dtype = case["dtype"]
    scales = SCALES[dtype]
    sa, sb = scales[case["sa"] % len(scales)], scales[case["sb"] % len(scales)]
    if dtype == torch.float16:  # keep |A||B| k below fp16's max (65504); spread reaches 1e3
        sb = min(sb, 8.0 / sa / case["k"] / (1e6 if case["dist"] == "spread" else 1.0))
    batch = case["batch"]
    a = make_operand(batch + (case["n"], case["k"]), case["dist"], sa, gen).to(dtype)
    b_batch = batch[1:] if case["broadcast_b"] else batch
    b = make_operand(b_batch + (case["k"], case["m"]), case["dist"], sb, gen).to(dtype)
    c, scale = scaled_product(a, b, case["scale"])
    assume(torch.isfinite(c).all())  # an overflowing product is not a clean one
    score = checks.matmul_checksum_score(a, b, c, scale=scale)
    assert score.shape == c.shape[:-1]
    assert score.max() <= 1, f"matmul score {score.max().item()} on a clean product ({case})"


# ------------------------------------------------------------------ clean linear layers

linear_cases = st.fixed_dictionaries({
    "dtype": st.sampled_from(DTYPES),
    # K a multiple of 64 above 64: float32 x takes the chunked prediction
    "tokens": st.integers(1, 6), "k": st.one_of(st.integers(1, 64), st.sampled_from([128, 768])),
    "groups": st.integers(1, 4), "group_size": st.integers(1, 16),
    "bias": st.booleans(),
    "scale": st.sampled_from([None, 0.125, 1 / math.sqrt(48), -3.0]),
    "sum_in_model_dtype": st.booleans(),
    "x_scale": st.sampled_from([1e-3, 1.0, 30.0]),
    "seed": st.integers(0, 2**31 - 1),
})


def linear_case(case: dict, gen: torch.Generator):
    dtype = case["dtype"]
    n_out = case["groups"] * case["group_size"]
    x = (torch.randn(2, case["tokens"], case["k"], generator=gen, dtype=torch.float64)
         * case["x_scale"]).to(dtype)
    weight = (torch.randn(n_out, case["k"], generator=gen, dtype=torch.float64)
              / math.sqrt(case["k"])).to(dtype)
    bias = torch.randn(n_out, generator=gen, dtype=torch.float64).to(dtype) if case["bias"] else None
    y = F.linear(x, weight, bias)
    if case["scale"] is not None:
        y = y * case["scale"]
    return x, weight, bias, y


def group_sums(y: torch.Tensor, groups: int, in_model_dtype: bool) -> torch.Tensor:
    heads = y.reshape(*y.shape[:-1], groups, -1)
    return heads.sum(-1) if in_model_dtype else heads.to(torch.float64).sum(-1)


@SETTINGS
@given(case=linear_cases)
def test_linear_checksum_clean_never_flags(case: dict) -> None:
    gen = torch.Generator().manual_seed(case["seed"])
    x, weight, bias, y = linear_case(case, gen)
    w_sum, w_abs, b_sum, b_abs = checks.linear_group_sums(weight, bias, case["groups"])
    y_groups = group_sums(y, case["groups"], case["sum_in_model_dtype"])
    score = checks.linear_checksum_score(x, y_groups, w_sum, w_abs, b_sum, b_abs,
                                         group_size=case["group_size"], scale=case["scale"])
    assert score.shape == y_groups.shape
    assert score.max() <= 1, f"linear score {score.max().item()} on a clean layer ({case})"


def row_checksum(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 y: torch.Tensor) -> torch.Tensor:
    """The output projection's check (``row_checksum_terms``) as the pass builds it."""
    w = weight.double().T
    w_e, wa_e, rounding = checks.row_sum_weights(w.sum(-1), w.abs().sum(-1), x.dtype)
    b = torch.zeros(1, dtype=torch.float64) if bias is None else bias.double()
    terms = checks.row_checksum_terms(x, w_e, wa_e, b.sum().reshape(1), b.abs().sum().reshape(1))
    return runtime.output_checksum_score(terms, y, rounding, in_features=x.shape[-1],
                                         in_dtype=x.dtype, has_bias=bias is not None)


@SETTINGS
@given(case=linear_cases)
def test_row_checksum_clean_never_flags(case: dict) -> None:
    gen = torch.Generator().manual_seed(case["seed"])
    x, weight, bias, y = linear_case({**case, "scale": None}, gen)
    score = row_checksum(x, weight, bias, y)
    assert score.shape == y.shape[:-1]
    assert score.max() <= 1, f"row checksum score {score.max().item()} on a clean layer ({case})"


# K = 768: 48 partial sums of 16 terms; 100 and 64: 16 of 7 and of 4 (``checks._block_shape``).
@pytest.mark.parametrize("dtype,k", [(torch.float32, 768), (torch.bfloat16, 768),
                                     (torch.float64, 768), (torch.float32, 100),
                                     (torch.bfloat16, 64)])
@pytest.mark.parametrize("scale", [1e-40, 1e-3, 1.0, 1e30])
def test_row_checksum_terms_bound_their_errors(dtype: torch.dtype, k: int, scale: float) -> None:
    """The blocked prediction is within ``row_checksum_error`` of x . w_sum + b and Q bounds
    sum |x| w_abs_sum + |b| from above, at any magnitude (subnormal products and flushed partial
    sums at 1e-40; weight sums near float32's underflow), against float64 references over
    K terms (their own error, ~1e-13 relative, is far below the bounds' ~1e-6)."""
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(3, 40, k, generator=gen, dtype=torch.float64) * scale).to(dtype)
    w_sum = torch.randn(k, generator=gen, dtype=torch.float64) * torch.logspace(-45, 2, k,
                                                                                  dtype=torch.float64)
    w_abs = w_sum.abs() * (1 + torch.rand(k, generator=gen, dtype=torch.float64))
    b_sum, b_abs = torch.tensor([0.3], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)
    w_e, wa_e, rounding = checks.row_sum_weights(w_sum, w_abs, dtype)
    assert (wa_e.double() >= w_abs).all()
    pred, q_bound = checks.row_checksum_terms(x, w_e, wa_e, b_sum, b_abs)[..., 0]
    x64 = x.double()
    exact_q = x64.abs() @ w_abs + b_abs
    rel, absolute = checks.row_checksum_error(k, dtype, rounding)
    assert ((pred - (x64 @ w_sum + b_sum)).abs() <= rel * exact_q + absolute).all()
    assert (q_bound >= exact_q).all()


@pytest.mark.parametrize("scale", [1e-40, 1e-3, 1.0, 1e30])
def test_chunked_prediction_bounds_its_error(scale: float) -> None:
    """The float32 chunked prediction of ``linear_checksum_terms`` is within its own bound E
    (third row) of x . w_sum + b, at any magnitude (subnormal products at 1e-40, weight sums
    near float32's underflow), against float64 references over K = 768 terms (their own error,
    ~1e-13 relative, is far below E's); a float64 x still takes the float64 GEMM (E = 0)."""
    gen = torch.Generator().manual_seed(11)
    k, groups = 768, 36
    x = (torch.randn(3, 40, k, generator=gen, dtype=torch.float64) * scale).to(torch.float32)
    w_sum = (torch.randn(k, groups, generator=gen, dtype=torch.float64)
             * torch.logspace(-45, 2, k, dtype=torch.float64).unsqueeze(1))
    w_abs = w_sum.abs() * (1 + torch.rand(k, groups, generator=gen, dtype=torch.float64))
    b_sum = torch.randn(groups, generator=gen, dtype=torch.float64)
    b_abs = b_sum.abs() * 2
    pred, q_abs, error = checks.linear_checksum_terms(x, w_sum, w_abs, b_sum, b_abs)
    x64 = x.double()
    exact_q = x64.abs() @ w_abs + b_abs
    assert ((pred - (x64 @ w_sum + b_sum)).abs() <= error).all()
    assert (q_abs >= exact_q).all()
    assert (checks.linear_checksum_terms(x64, w_sum, w_abs, b_sum, b_abs)[2] == 0).all()
    # Weight sums of ordinary magnitude round to float32 within 2^-24: E is then ~1e-5 of Q
    # (rel_c + r + gamma_13(2^-53) = 7.63e-6 + 6e-8 + ~0, under a tenth of the projection's ~1e-4).
    w_sum = torch.randn(k, groups, generator=gen, dtype=torch.float64) / 8
    w_abs = w_sum.abs() * (1 + torch.rand(k, groups, generator=gen, dtype=torch.float64))
    pred, q_abs, error = checks.linear_checksum_terms(x, w_sum, w_abs, b_sum, b_abs)
    assert ((pred - (x64 @ w_sum + b_sum)).abs() <= error).all()
    assert (error <= 8e-6 * q_abs + 2 * k * torch.finfo(torch.float32).tiny).all()


def test_autocast_products_never_flag() -> None:
    """fp32 operands, bf16 GEMM: the default accum_u covers the GEMM's rounding of its inputs."""
    gen = torch.Generator().manual_seed(5)
    for _ in range(20):
        a, b = torch.randn(3, 8, 200, generator=gen), torch.rand(3, 200, 16, generator=gen)
        case = {"dtype": torch.float32, "tokens": 4, "k": 200, "groups": 4, "group_size": 8,
                "bias": True, "scale": None, "x_scale": 1.0}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            c = a @ b
            x, weight, bias, y = linear_case(case, gen)
        assert c.dtype == y.dtype == torch.bfloat16
        assert checks.matmul_checksum_score(a, b, c).max() <= 1
        score = checks.linear_checksum_score(x, group_sums(y, 4, False),
                                             *checks.linear_group_sums(weight, bias, 4),
                                             group_size=8, out_dtype=torch.bfloat16)
        assert score.max() <= 1


def test_gemm_roundoff_follows_torch_flags() -> None:
    assert checks.gemm_roundoff(torch.float32) == (0.0, 2 * 2.0**-24)
    assert checks.gemm_roundoff(torch.bfloat16) == (0.0, 2 * 2.0**-24)
    assert checks.gemm_roundoff(torch.float64) == (0.0, 2 * 2.0**-53)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")  # TF32: 11-bit significands, truncated at worst
        assert checks.gemm_roundoff(torch.float32, "cuda")[0] == 2.0**-10
        torch.set_float32_matmul_precision("medium")
        assert checks.gemm_roundoff(torch.float32, "cpu")[0] == 2.0**-7
    finally:
        torch.set_float32_matmul_precision(before)
    assert checks.default_gemm_roundoff(torch.bfloat16, torch.float32) == (2.0**-7, 2 * 2.0**-24)


# ------------------------------------------------------------------ detection

DRAWS = 200


def detection_fraction(draw, bit: int, dtype: torch.dtype = torch.float32) -> float:
    """Fraction of DRAWS random single-bit faults whose row is flagged; draw(gen, bit, dtype) -> bool."""
    gen = torch.Generator().manual_seed(1234 + bit)
    return sum(draw(gen, bit, dtype) for _ in range(DRAWS)) / DRAWS


def softmax_fault(check: str):
    def draw(gen: torch.Generator, bit: int, dtype: torch.dtype) -> bool:
        length = 64
        x = (torch.randn(8, length, generator=gen, dtype=torch.float64) * 3).to(dtype)
        logits, valid = apply_mask(x, "causal", gen)
        w = torch.softmax(logits, -1)
        row = int(torch.randint(0, 8, (1,), generator=gen))
        col = int(torch.randint(0, int(valid[row].sum()), (1,), generator=gen))  # a valid key
        bad = flip_bit(w, (row, col), bit)
        if check == "sum":
            score = checks.softmax_sum_score(bad, logits)
        else:
            score = checks.softmax_bounds_score(logits, bad, lambertw_table(length))
        return bool(score[row] > 1)
    return draw


def matmul_fault(gen: torch.Generator, bit: int, dtype: torch.dtype) -> bool:
    a = torch.randn(2, 16, 64, generator=gen, dtype=torch.float64).to(dtype)
    b = torch.randn(2, 64, 32, generator=gen, dtype=torch.float64).to(dtype)
    c = torch.matmul(a, b)
    idx = tuple(int(torch.randint(0, s, (1,), generator=gen)) for s in c.shape)
    return bool(checks.matmul_checksum_score(a, b, flip_bit(c, idx, bit))[idx[:-1]] > 1)


def linear_fault(gen: torch.Generator, bit: int, dtype: torch.dtype) -> bool:
    case = {"dtype": dtype, "tokens": 8, "k": 64, "groups": 4, "group_size": 16, "bias": True,
            "scale": 0.125, "x_scale": 1.0}
    x, weight, bias, y = linear_case(case, gen)
    idx = tuple(int(torch.randint(0, s, (1,), generator=gen)) for s in y.shape)
    y_groups = group_sums(flip_bit(y, idx, bit), 4, in_model_dtype=False)
    score = checks.linear_checksum_score(x, y_groups, *checks.linear_group_sums(weight, bias, 4),
                                         group_size=16, scale=0.125)
    return bool(score[idx[0], idx[1], idx[2] // 16] > 1)


def row_fault(gen: torch.Generator, bit: int, dtype: torch.dtype) -> bool:
    case = {"dtype": dtype, "tokens": 8, "k": 64, "groups": 4, "group_size": 16, "bias": True,
            "scale": None, "x_scale": 1.0}
    x, weight, bias, y = linear_case(case, gen)
    idx = tuple(int(torch.randint(0, s, (1,), generator=gen)) for s in y.shape)
    return bool(row_checksum(x, weight, bias, flip_bit(y, idx, bit))[idx[:-1]] > 1)


DETECTORS = {"softmax_sum": softmax_fault("sum"), "softmax_bounds": softmax_fault("bounds"),
             "matmul": matmul_fault, "linear": linear_fault, "row": row_fault}


@pytest.mark.parametrize("name", list(DETECTORS))
def test_bit30_flips_are_detected(name: str) -> None:
    frac = detection_fraction(DETECTORS[name], bit=30)
    low = detection_fraction(DETECTORS[name], bit=0)
    bf16 = detection_fraction(DETECTORS[name], bit=14, dtype=torch.bfloat16)
    print(f"{name}: fp32 bit30 {frac:.3f}, fp32 bit0 {low:.3f}, bf16 bit14 {bf16:.3f}")
    assert frac >= 0.95, f"{name}: bit-30 detection {frac:.3f} over {DRAWS} draws"
    # Flipping the lowest mantissa bit changes a value by one ulp, inside rounding noise.
    assert low <= 0.5, f"{name}: bit-0 flips flagged in {low:.3f} of {DRAWS} draws"


# ------------------------------------------------------------------ torch.compile


def all_checks(logits, weights, table, a, b, c, c_scale, x, y_groups, w_sum, w_abs, b_sum, b_abs):
    return (checks.softmax_bounds_score(logits, weights, table),
            checks.softmax_sum_score(weights, logits),
            checks.matmul_checksum_score(a, b, c, scale=c_scale),
            checks.linear_checksum_score(x, y_groups, w_sum, w_abs, b_sum, b_abs,
                                         group_size=4, scale=0.125))


def test_checks_compile_fullgraph_and_match_eager() -> None:
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    logits, _ = apply_mask(torch.randn(6, 8, generator=gen), "causal", gen)
    weights = flip_bit(torch.softmax(logits, -1), (2, 0), 30)
    a, b = torch.randn(2, 3, 5, generator=gen), torch.randn(2, 5, 4, generator=gen)
    c, c_scale = scaled_product(a, b, ("div_tensor", 2.5))
    c = flip_bit(c, (1, 2, 3), 30)
    case = {"dtype": torch.float32, "tokens": 3, "k": 8, "groups": 2, "group_size": 4,
            "bias": True, "scale": 0.125, "x_scale": 1.0}
    x, weight, bias, y = linear_case(case, gen)
    y_groups = group_sums(flip_bit(y, (0, 1, 5), 30), 2, in_model_dtype=False)
    args = (logits, weights, lambertw_table(8), a, b, c, c_scale, x, y_groups,
            *checks.linear_group_sums(weight, bias, 2))
    eager = all_checks(*args)
    compiled = torch.compile(all_checks, fullgraph=True)(*args)
    for i, (e, k) in enumerate(zip(eager, compiled)):
        assert torch.equal(e > 1, k > 1)
        finite = torch.isfinite(e)
        assert torch.equal(finite, torch.isfinite(k))
        if i == 3:  # linear ABFT: float64 throughout, so eager and compiled agree to its rounding
            torch.testing.assert_close(e[finite], k[finite])
        else:
            # The softmax checks and the matmul ABFT sum rows in float32 (whole or in blocks of
            # 16), in another order when compiled. Each evaluation's violation is within the
            # part of the tolerance that pays for the check's own rounding (< tol) of the exact
            # one: < 2 in score units. The tolerance itself comes from float32 sums of
            # magnitudes, relative error <= g = gamma_n(2^-24) (n <= 16 terms here) each time,
            # which moves a large score by < 4 g of itself.
            g = checks.gamma(16, 2.0**-24)
            bound = 2 + 4 * g * torch.maximum(e[finite], k[finite])
            assert ((e[finite] - k[finite]).abs() < bound).all()
    flagged = [int((e > 1).sum()) for e in eager]
    assert flagged[0] >= 1 and flagged[1] >= 1 and flagged[2] == 1 and flagged[3] == 1


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 9), st.integers(0, 2**31 - 1), st.floats(0.0, 1.0))
def test_top2_values_equal_topk(length: int, seed: int, p_valid: float) -> None:
    """The fused two-max top-2 equals topk on the valid entries, ties and short rows included."""
    from fxsdc.checks import top2_values
    from fxsdc.utils import top2
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, (5, length), generator=gen).double()  # small ints: many ties
    valid = torch.rand(5, length, generator=gen) < p_valid
    first, second = top2_values(x, valid)
    expected, _ = top2(x, mask=valid)
    assert torch.equal(first, expected[:, 0]) and torch.equal(second, expected[:, 1])
    # Given the rows' maximum over all entries, as the bounds check does when masked entries
    # are the ones below finfo.min / 2: the same values wherever a row has a valid entry.
    masked = torch.where(valid, x, torch.finfo(x.dtype).min)
    first, second = top2_values(masked, valid, masked.amax(-1, keepdim=True))
    some = valid.any(-1)
    assert torch.equal(first[some], expected[some, 0])
    assert torch.equal(second[some], expected[some, 1])


def test_use_float32_gemm_accumulation_turns_off_16_bit_reductions() -> None:
    matmul = torch.backends.cuda.matmul
    saved = (matmul.allow_bf16_reduced_precision_reduction,
             matmul.allow_fp16_reduced_precision_reduction)
    try:
        matmul.allow_bf16_reduced_precision_reduction = True
        matmul.allow_fp16_reduced_precision_reduction = True
        checks.use_float32_gemm_accumulation()
        assert not matmul.allow_bf16_reduced_precision_reduction
        assert not matmul.allow_fp16_reduced_precision_reduction
    finally:
        (matmul.allow_bf16_reduced_precision_reduction,
         matmul.allow_fp16_reduced_precision_reduction) = saved
