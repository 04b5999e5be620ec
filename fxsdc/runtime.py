"""Runtime ops called by the nodes that the passes insert.

Everything here is plain tensor code: no ``.item()``, no host sync, no Python branch on a tensor
value (branches on shapes and dtypes are static under tracing and compilation). What changes
between trials is read from tensors (the fault table), so one compiled graph serves a sweep.

Fault table (buffers registered on the instrumented GraphModule), one column per *slot*; a
slot hits one element of one sample, so a batch of B samples can run B independent trials:

- ``word[S, F]`` int64, one *select word* per site and slot: -1 where the slot does not hit the
  site, else the element's flat offset in the site's tensor, in the logical row-major order of
  its per-sample layout with the batch leading, e.g. (B, H, T, T) for scores. Where
  :func:`packs_mask` holds (masks of at most 32 bits, tensors under 2**31 elements) the offset is
  in the high 32 bits and the low 32 bits hold the slot's mask (:func:`select_word`);
- ``mask[F]``   int64: XOR mask of the flipped bits as a signed integer of the site dtype's width
  (:func:`fxsdc.bits.xor_mask`);
- ``before[F]``, ``after[F]`` float64: written by the forward pass, the element's value before and
  after the flip; a slot that does not fire leaves them as they were (the host fills them with
  NaN when it arms the faults).

How a site is flipped: where the model stores the site's tensor anyway (a GEMM's output; the
weights feeding the second GEMM), in place, O(slots) (``fxsdc::xor_elements_``); elsewhere (the
scaled scores, which compiled models fuse into the softmax), by a select inside the kernel that
consumes the tensor. Why one word per slot: inductor counts every load in a pointwise node and
materialises a node read twice (softmax reads its input for the max and the sum) when it has more
than ``realize_reads_threshold`` = 4 loads. GPT-2's masked scores load three (the product, the
causal bias and the attention mask), so one word per slot keeps them fused as in the original
model. A table of separate site/batch/pos/mask loads made inductor store the scores in an extra
pass (CPU, GPT-2 small at 4 x 256: ~1 ms per layer, of ~21 ms outside the GEMMs).

Probabilistic faults use one entry per sample: ``site``, ``batch``, ``rate`` (probability that each
element of the site is hit), ``seed``, ``mask`` (0 picks a random bit per hit element) and
``count`` (flips applied, written by the forward pass). Hits come from a counter-based hash of
(seed, element offset), so the host can recompute exactly which elements were hit, and compiled
and eager runs agree.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .bits import layout
from .checks import in_eager_layout, sliced_when_eager


def _flip(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values`` with the bits of ``mask`` (a signed integer of their width) flipped."""
    int_dtype = layout(values.dtype).int_dtype
    return (values.view(int_dtype) ^ mask.to(int_dtype)).view(values.dtype)


def _per_sample(x: torch.Tensor, fused_heads: int) -> torch.Tensor:
    """View ``x`` with the batch as its leading dim. Layouts (B, ...) are used as they are,
    keeping their strides; fused layouts (B*H, T, X), as in OPT, are contiguous outputs of bmm or
    ``view``, so viewing them as (B, H, T, X) is free."""
    return x if not fused_heads else x.view(-1, fused_heads, *x.shape[1:])


def packs_mask(dtype: torch.dtype, numel: int) -> bool:
    """Whether a site of ``dtype`` and ``numel`` elements (whole batch) packs each slot's mask
    into its select word: the offset fits the high 32 bits and the mask the low 32."""
    return layout(dtype).width <= 32 and numel < 2**31


def select_word(offset: int, mask: int, packed: bool) -> int:
    """The select word of a slot hitting flat ``offset`` with XOR ``mask`` (host side)."""
    return (offset << 32) | (mask & 0xFFFFFFFF) if packed else offset


def inject_bitflips(x: torch.Tensor, site_id: int, fused_heads: int, word: torch.Tensor,
                    mask: torch.Tensor, before: torch.Tensor, after: torch.Tensor, *,
                    in_place: bool = False, source: torch.Tensor | None = None,
                    scale: torch.Tensor | float | None = None, divide: bool = False,
                    store: bool = False) -> torch.Tensor:
    """Flip the bits the fault table assigns to site ``site_id`` in ``x``; record before/after.

    The pass picks how (:func:`passes.insert_injection.injection_kwargs`), from the graph:

    - ``in_place``: ``x`` is a tensor the model stores anyway and nothing else reads (a GEMM's
      output or a view of one, or weights that only feed a GEMM). The slots' elements are read,
      flipped and written back: O(slots) work and nothing per element, compiled (inductor
      re-inplaces the write on the buffer) or eager.
    - ``source``: the scaled scores, which compiled models never store (they are fused into the
      softmax). The records come from the product q·kᵀ (a GEMM output), scaled by ``scale``
      (``divide``: divided) as the model's own op does, so they are bitwise the values the model
      computed; compiled, each element is compared with the slots' targets and the flipped
      values are substituted whole.
    - neither: compiled, each element is compared with the slots' targets and flipped where one
      matches; the records come from the flipped tensor.

    Eagerly, a site that is not ``in_place`` is copied and the copy flipped in place (with grad
    mode on and x requiring grad: a mask tensor XOR-ed with x, which autograd can follow).

    ``store``: under torch.compile, the checks read the site, so it is stored anyway (see
    :func:`passes.insert_checks.store_checked_sites`): it is stored unflipped and then flipped
    in place, as an ``in_place`` site."""
    xs = _per_sample(x, fused_heads)
    total = xs.numel()
    packed = packs_mask(x.dtype, total)
    words = word[site_id]
    offset = words >> 32 if packed else words
    # A table armed for another input shape may point past this tensor: such slots do nothing.
    active = (words >= 0) & (offset < total)
    # Packed, the mask is the word's low bits, which the cast to the site's integer width in
    # _flip keeps (a truncation), so no operation extracts it.
    bits = words if packed else mask
    index = offset.clamp(0, total - 1)
    # Idle words (offset -1) and offsets past the tensor (clamped to its size) match no element
    # of a select: one operation, where testing `active` takes four (see _select).
    target = offset.clamp(max=total)
    int_dtype = layout(x.dtype).int_dtype

    # With grad mode on, autograd refuses in-place writes to a split's pieces: those select.
    can_write = not (x.requires_grad and torch.is_grad_enabled())
    if store and not in_place and can_write and torch.compiler.is_compiling():
        # Stored anyway (the checks read it): store it unflipped and flip the stored copy in
        # place, O(slots), rather than select the flipped values on the way to the store, a
        # comparison per element (2.2 against 1.0 ms for a (4, 12, 256, 256) float32 store on
        # a 2-vCPU AVX-512 Xeon, micro benchmark).
        x = _stored(x)
        xs = _per_sample(x, fused_heads)
        in_place = True
    elif not in_place and can_write and not torch.compiler.is_compiling():
        # Eager, a site the model does not store for anything else (the scaled scores): flip a
        # copy in place, O(numel) once, instead of scattering the slots' masks into a tensor of
        # its size and XOR-ing the two (three passes; ~10 ms of a GPT-2 small layer's 4 x 256
        # eager forward, one thread). Eagerly the copy holds the model's own values, so the
        # records read from it are those a ``source`` would give.
        x = x.clone()
        xs = _per_sample(x, fused_heads)
        in_place = True
    writes_in_place = in_place and can_write
    hit = None
    if writes_in_place:
        # An idle slot is clamped onto some element, perhaps an active slot's: both write the
        # active slot's flip there. (The host merges active slots that share an element.)
        shared = (index.unsqueeze(1) == index.unsqueeze(0)) & active
        xor = torch.where(shared, bits, 0).sum(1).to(int_dtype)  # cast here: fused, not in the op
        # Written through x itself, not a detached alias: inductor (2.13) miscompiles writes
        # through a detached view (two of one buffer: GPT-2's q and k, pieces of one addmm).
        hit = torch.ops.fxsdc.xor_elements_(x, index, xor)
    elif in_place or source is not None:
        hit = torch.ops.fxsdc.take_elements(
            x.detach() if in_place else _per_sample(source, fused_heads).detach(), index)
        if scale is not None:
            hit = hit / scale if divide else hit * scale
    if hit is not None:
        flipped_hit = _flip(hit, bits)

    if writes_in_place:
        flipped = xs
    elif torch.compiler.is_compiling():
        if hit is not None and packed:
            # One word per slot again, now the target and the flipped value's bits: the kernel
            # substitutes a scalar, with no per-element bit casts (which inductor's C++ backend
            # makes a store, 16 scalar casts and a load per vector: measured on a 2-vCPU Xeon,
            # AVX-512, +12.6 ms on a (4, 12, 256, 256) float32 softmax of 4 ms, against +2 ms
            # for a select of values).
            # A narrower value travels as the float32 that holds it exactly: inductor's C++
            # backend does not vectorise a 16-bit bit cast, and a scalar loop then also
            # computes the softmax's exp with another function than the original's, so the
            # output changed in its last bits (bfloat16 GPT-2, 4 x 256). A flipped value that
            # is a NaN may reach the model with another NaN payload; the records keep its bits.
            as_float32 = flipped_hit.to(torch.float32)
            value_bits = as_float32.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
            values = _stored((target << 32) | value_bits)
            flipped = _select(xs, values >> 32,
                              lambda f: values[f].to(torch.int32).view(torch.float32).to(x.dtype))
        else:
            flipped = _select(xs, target, lambda f: _flip(xs, bits[f]))
        if store:
            flipped = _stored(flipped)
    else:
        # Eager with grad (no in-place writes): scatter the slots' masks, O(numel + slots). Idle
        # slots write 0 to a spare last element; the host merges slots that share one.
        xor = torch.zeros(total + 1, dtype=int_dtype, device=x.device).index_put(
            (torch.where(active, offset, total),), bits.to(int_dtype))[:total]
        flipped = _flip(xs, xor.view(xs.shape))
    if hit is None:
        # The slots' elements are read through an opaque op, which makes inductor materialise
        # the flipped tensor (the next op, a GEMM or the copy feeding one, usually needs it
        # materialised too). A plain gather lets inductor fuse the records of every site into
        # one late kernel that keeps each site's tensor alive until then (measured: +680 MiB
        # peak on 12-layer GPT-2).
        flipped_hit = torch.ops.fxsdc.take_elements(flipped.detach(), index)
        hit = _flip(flipped_hit, bits)
    # The host merges slots on one element, so an active slot's values before and after the
    # flip differ by exactly its own mask.
    before.copy_(torch.where(active, hit.to(before.dtype), before))
    after.copy_(torch.where(active, flipped_hit.to(after.dtype), after))
    return flipped.view(x.shape)


def _select(xs: torch.Tensor, target: torch.Tensor,
            flipped: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """``xs`` with its element at flat offset ``target[f]`` replaced by ``flipped(f)``, for
    each slot f: a pointwise select that inductor fuses into the kernels that produce or consume
    xs, so an idle injection node costs no extra pass over memory. Inductor stores a reused
    pointwise node of more than 30 operations on GPUs (50 on CPUs; the softmax input with a
    scores slot's select has about 25 in GPT-2, `realize_opcount_threshold`) or more than 4
    loads (`realize_reads_threshold`; GPT-2's masked scores load three): hence one comparison
    and one word per slot.

    The element index is int32 on GPUs where it fits (they emulate int64 arithmetic), int64 on
    CPUs, the loop counter's type: inductor's C++ backend builds an int32 index vector from 16
    converted scalars (measured on AVX-512: +13 % on a pass over 3.1 M float32 elements)."""
    total = xs.numel()
    on_gpu = xs.device.type != "cpu"
    index_dtype = torch.int32 if on_gpu and total < 2**31 else torch.int64
    flat = torch.arange(total, device=xs.device, dtype=index_dtype).view(xs.shape)
    target = target.to(index_dtype)
    result = xs
    for f in range(target.shape[0]):  # slots: a static count
        result = torch.where(flat == target[f], flipped(f), result)
    return result


def _stored(t: torch.Tensor) -> torch.Tensor:
    """``t``, which inductor must store in a buffer rather than recompute in each reader: its
    stride-order hint realises its input (with no copy when the strides already match), except a
    tensor of one element, which it returns as it is; those go through an opaque copy."""
    if t.numel() <= 1:
        return torch.ops.fxsdc.copy(t)
    return in_eager_layout(t)


def stored_when_compiling(x: torch.Tensor) -> torch.Tensor:
    """``x``; under torch.compile stored in a buffer of its own, which the compiled model's
    kernels read. Inserted where a checked layer's checks read a value that the compiled model
    would recompute (the scaled scores, the logits) and no injection node stores it
    (``passes.insert_checks.store_checked_sites``, ``passes.insert_checks.store_logits``).

    As an injection node does with its flip in place: ``_stored`` realises x, and an opaque op
    that writes x (``fxsdc::xor_elements_`` on no element) ends the kernel that stores it. With
    the store alone, inductor fused it with the softmax and every check loop into one kernel of
    27 ms, against 22 ms for the same work split at the store (one GPT-2 small layer, 4 x 256,
    CPU, paired profile)."""
    if not torch.compiler.is_compiling():
        return x
    x = _stored(x)
    none = torch.zeros(0, dtype=torch.long, device=x.device)
    torch.ops.fxsdc.xor_elements_(x, none, none.to(layout(x.dtype).int_dtype))
    return x


def stored_as_float(mask: torch.Tensor) -> torch.Tensor:
    """A boolean ``mask`` read back from a stored float32 copy (the same values).

    Inductor's C++ code expands a vector of bools element by element (``VecMask::from(bool*)``),
    where a float vector is one load and one comparison: a pass over GPT-2's causal-masked
    [4, 12, 256, 256] logits took 3.4 ms with the bool mask and 1.7 ms with a float copy of it
    (compiled, one thread, Xeon). The copy is the mask's size, not the logits'."""
    return _stored(mask.to(torch.float32)) != 0


def stored_operand(x: torch.Tensor) -> torch.Tensor:
    """``x`` read back from a buffer of its own under torch.compile (the same values). For a small
    operand that inductor would otherwise recompute in every element of a loop over a larger
    tensor: GPT-2's additive attention mask, (1 - mask) * finfo.min from the [B, T] int64 mask,
    cost each element of a pass over the [B, H, T, T] logits two int64 vector loads and a
    conversion (that pass 2.0 -> 1.7 ms stored, GPT-2 small at 4 x 256, compiled, one thread)."""
    return _stored(x)


def recomputed_when_compiling(values: torch.Tensor, recompute: torch.nn.Module,
                              *inputs: object) -> torch.Tensor:
    """``values`` eagerly; under torch.compile ``recompute(*inputs)``, which gives the same values
    from ops that compile to cheaper code (see ``passes.insert_checks.insert_check_logits``).
    Eagerly ``values`` is already in memory, and recomputing it would cost a pass and a tensor of
    its size."""
    return recompute(*inputs) if torch.compiler.is_compiling() else values


# ``fxsdc::take_elements(x, index)``: ``torch.take`` (the elements at flat row-major offsets of
# x, whatever its strides) as an op inductor cannot see into. A compiled forward calls it from
# Python once per injection site, so on a GPU, where a small model's kernels take microseconds,
# its host time is the cost: one ``torch.take`` (one kernel), with the offsets computed in the
# graph, registered through the low-level ``torch.library.Library``, whose dispatch costs about a
# third of a ``custom_op`` wrapper's (CPU, measured: ~4 against ~10-17 us per call). Callers pass
# detached tensors: the records carry no autograd history, so the op needs no autograd kernel.
_LIBRARY = torch.library.Library("fxsdc", "DEF")
_LIBRARY.define("take_elements(Tensor x, Tensor index) -> Tensor")
_LIBRARY.impl("take_elements", torch.take, "CompositeExplicitAutograd")


@torch.library.register_fake("fxsdc::take_elements")
def _take_elements_shape(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.new_empty(index.shape)


# ``fxsdc::copy(x)``: a copy inductor cannot see into, so that both its input and its output are
# stored (see _stored).
_LIBRARY.define("copy(Tensor x) -> Tensor")
_LIBRARY.impl("copy", torch.clone, "CompositeExplicitAutograd")


@torch.library.register_fake("fxsdc::copy")
def _copy_shape(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


# ``fxsdc::xor_elements_(x, index, bits)``: XOR ``bits`` (integers of x's width, e.g. int32 for
# float32) into the elements at flat row-major offsets of x, whatever its strides, and return
# their values before. Declared as mutating x: functionalised under torch.compile, then
# re-inplaced by inductor onto x's own buffer when nothing reads x's old value afterwards, as
# holds for an injection site (its node's users read the injection node). One op both reads and
# writes: with a separate read, inductor stored a softmax output twice, for the read and the write.
_LIBRARY.define("xor_elements_(Tensor(a!) x, Tensor index, Tensor bits) -> Tensor")


def _xor_elements(x: torch.Tensor, index: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    # Three ops on x's integer view: a compiled forward calls this from Python once per site.
    # (Callers write in place only where autograd does not record x, see inject_bitflips.)
    as_int = x.view(bits.dtype)
    values = as_int.take(index)
    as_int.put_(index, values ^ bits)
    return values.view(x.dtype)


_LIBRARY.impl("xor_elements_", _xor_elements, "CompositeExplicitAutograd")


@torch.library.register_fake("fxsdc::xor_elements_")
def _xor_elements_shape(x: torch.Tensor, index: torch.Tensor, bits: torch.Tensor
                        ) -> torch.Tensor:
    return x.new_empty(index.shape)


_HASH_MUL = (0x7FEB352D, 0x446F2D5B)  # odd 31-bit multipliers: products stay below 2**63


def _hash32(values: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix of non-negative int64 values (two xorshift-multiply rounds)."""
    h = values & 0xFFFFFFFF
    for mul in _HASH_MUL:
        h = h ^ (h >> 16)
        h = (h * mul) & 0xFFFFFFFF
    return h ^ (h >> 15)


def random_hits(numel: int, seed: torch.Tensor, rate: torch.Tensor, width: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For each fault-table entry: which of ``numel`` elements are hit (``[F, numel]`` bool) and
    which bit each flips (uniform over ``width``). Host and device compute the same thing."""
    offset = torch.arange(numel, device=device, dtype=torch.int64)
    # _hash32 keeps the low 32 bits of its input, so the seed is mixed into them.
    key = (offset.unsqueeze(0) * 2) ^ (_hash32(seed).unsqueeze(1) << 1)
    uniform = _hash32(key).to(torch.float64) / 2.0 ** 32
    bit = _hash32(key + 1) % width
    return uniform < rate.unsqueeze(1).to(torch.float64), bit


def inject_random(x: torch.Tensor, site_id: int, fused_heads: int, site: torch.Tensor,
                  batch: torch.Tensor, rate: torch.Tensor, seed: torch.Tensor,
                  mask: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Probabilistic faults: entry f hits each element of sample batch[f] with probability
    rate[f], flipping mask[f] or, where it is 0, one random bit."""
    xs = _per_sample(x, fused_heads)
    sample_shape = tuple(xs.shape[1:])
    numel = xs[0].numel()
    lay = layout(x.dtype)
    hit, bit = random_hits(numel, seed, rate, lay.width, x.device)  # [F, numel]
    hit = hit & (site == site_id).unsqueeze(1)
    random_mask = torch.bitwise_left_shift(torch.ones_like(bit), bit)
    chosen = torch.where(mask.unsqueeze(1) != 0, mask.unsqueeze(1), random_mask)
    # Masks with the top bit set are stored as negative numbers; the cast keeps the low bits.
    per_entry = torch.where(hit, chosen, 0).to(lay.int_dtype)  # [F, numel]
    sample = torch.arange(xs.shape[0], device=x.device)
    owner = sample.unsqueeze(1) == batch.unsqueeze(0)  # [B, F]
    xor = torch.zeros((xs.shape[0], numel), dtype=lay.int_dtype, device=x.device)
    for f in range(site.shape[0]):
        xor = xor ^ torch.where(owner[:, f:f + 1], per_entry[f:f + 1], 0)
    count.add_(hit.sum(dim=1))
    return (xs.view(lay.int_dtype) ^ xor.view(xs.shape)).view(x.dtype).view(x.shape)


# -- check nodes --------------------------------------------------------------------------------
def record_check(score: torch.Tensor, check_id: int, batch_ref: torch.Tensor, rows: torch.Tensor,
                 max_score: torch.Tensor, first: torch.Tensor, samples: torch.Tensor) -> None:
    """Accumulate one check's per-row scores (flagged iff > 1) into the detector state:
    ``rows[c] += (rows checked, rows flagged)``, ``max_score[c]`` = largest score so far,
    ``first[c]`` = flat index of the first flagged row of the first pass that flagged one,
    ``samples[c, b] +=`` rows flagged in sample b. Scores are batch-major in every layout
    ((B, H, T), (B*H, T), (B*T,)), so the model input ``batch_ref`` (B, T) splits them by sample.

    Every statistic is first taken per sample (count, maximum, first flagged row), three
    reductions over the same (sample, row) loop, which inductor runs as one loop that computes
    each score once; whole-tensor maximum and first index reduced a flat view instead, a loop of
    their own that recomputed the score (~1 ms of the checks of one GPT-2 small layer, 4 x 256,
    one thread, in per-loop timings)."""
    per_sample = score.detach().reshape(batch_ref.shape[0], -1)  # no autograd history
    length = per_sample.shape[1]
    flags = per_sample > 1
    counts = flags.sum(dim=1)
    row = torch.arange(length, device=score.device)
    sample_first = torch.where(flags, row, length).amin(dim=1)  # length: none flagged
    samples[check_id, : counts.shape[0]] += counts
    flagged = counts.sum()
    rows[check_id, 0] += flags.numel()
    rows[check_id, 1] += flagged
    max_score[check_id] = torch.maximum(max_score[check_id],
                                        per_sample.amax(dim=1).max().to(max_score.dtype))
    start = torch.arange(counts.shape[0], device=score.device) * length
    index = torch.where(sample_first < length, start + sample_first, flags.numel()).min()
    first[check_id] = torch.where((first[check_id] < 0) & (flagged > 0), index, first[check_id])


def scores_checksum_score(q: torch.Tensor, k_t: torch.Tensor, scores: torch.Tensor,
                          scale: torch.Tensor | float | None, divide: bool) -> torch.Tensor:
    """ABFT of the scaled attention scores ``scores = (q @ k_t) / scale`` (or ``* scale``);
    the scale is the constant as the model holds it (a 0-d tensor or a Python number)."""
    from .checks import matmul_checksum_score
    if scale is None:
        return matmul_checksum_score(q, k_t, scores)
    if isinstance(scale, torch.Tensor):
        factor = scale.to(torch.float64)
        factor = 1.0 / factor if divide else factor
    else:
        factor = 1.0 / float(scale) if divide else float(scale)
    return matmul_checksum_score(q, k_t, scores, scale=factor)


def projection_checksum_score(terms: torch.Tensor, heads: torch.Tensor, *,
                              columns: tuple[int, int], in_features: int, in_dtype: torch.dtype,
                              has_bias: bool, scale: float | None,
                              group_size: int) -> torch.Tensor:
    """ABFT of a q/k/v projection seen through the per-head tensor ``heads`` (B, H, T, D) that
    attention consumes: each head's sum over D against x·(W's head columns)·1 + Σ bias, read
    from ``terms[..., columns[0]:columns[1]]`` (``checks.linear_checksum_terms``, shared by the
    projections of one input)."""
    from .checks import element_dtype, linear_checksum_verdict
    batch, heads_n, seq, _ = heads.shape
    # Each head's sum in float32 (float64 for float64 heads): the verdict charges its rounding,
    # gamma_D(2^-24), about 4 % of the projection's own error bound at D = 64, K = 768, and
    # float32 vectors hold twice the lanes. (The output projection's sums, over K columns,
    # stay in float64: there it would be half as large as the bound.)
    y_groups = heads.to(element_dtype(heads.dtype)).sum(-1).transpose(1, 2)  # [B, T, H]
    own = terms[..., columns[0]:columns[1]].reshape(-1, batch, seq, heads_n)
    return linear_checksum_verdict(own, y_groups, in_features=in_features, in_dtype=in_dtype,
                                   has_bias=has_bias, group_size=group_size, scale=scale,
                                   out_dtype=heads.dtype)


def output_checksum_score(terms: torch.Tensor, y: torch.Tensor, weight_rounding: torch.Tensor, *,
                          in_features: int, in_dtype: torch.dtype, has_bias: bool) -> torch.Tensor:
    """ABFT of the attention output projection: each row's sum against x·(W·1) + Σ bias, with
    ``terms`` from ``checks.row_checksum_terms`` and y's rows summed the same way, in blocks of
    the element dtype (``weight_rounding``: ``checks.row_sum_weights``'s r)."""
    from .checks import (_sum_in_blocks, blocked_sum_error, element_dtype, linear_checksum_verdict,
                         row_checksum_error)
    elem = element_dtype(y.dtype)
    return linear_checksum_verdict(
        terms, _sum_in_blocks(y.to(elem)).unsqueeze(-1), in_features=in_features,
        in_dtype=in_dtype, has_bias=has_bias, group_size=y.shape[-1], out_dtype=y.dtype,
        group_sum_error=blocked_sum_error(y.shape[-1], elem),
        prediction_error=row_checksum_error(in_features, in_dtype, weight_rounding))[..., 0]


@sliced_when_eager
def qo_bounds_score(logits: torch.Tensor, weights: torch.Tensor, q: torch.Tensor,
                    o: torch.Tensor, v: torch.Tensor, w_table: torch.Tensor,
                    scale: torch.Tensor | float | None, divide: bool) -> torch.Tensor:
    """The seed's "q@o" path: ε = a* − s·(q·o) against the same Lambert-W bounds as s@w.

    Valid only where K = V (the pass checks it): then s·Σ_j w_j q·k_j = s·q·Σ_j w_j v_j. ``q``,
    ``o`` (the consumed weights·v output) and ``v`` are in the product's layout, rows matching
    ``logits``. Tolerance: the s@w tolerance of the stored (logits, weights) plus the distance
    between Σ_j w_j a_j and s·q·o, row i, D = head dim, n = keys, u_acc = the GEMMs'
    accumulation roundoff, u_out = o's unit roundoff, P = |q|·(|w| |V|) (= Σ_j |w_j| |q|·|v_j|):
      logits:  a_j = fl(s fl(q·k_j)) errs by ≤ |s| γ_D(u_acc) |q|·|k_j| + γ_3(u_out) |a_j|
               (product rounding, the scale's conversion, the scaling), weighted: |s| γ_D P +
               γ_3(u_out) Σ_j |w_j a_j|;
      output:  o_d = fl(Σ_j w_j v_jd) errs by ≤ γ_n(u_acc) (|w||V|)_d + u_out |o_d|, so s·q·o errs
               by ≤ |s| (γ_n(u_acc) P + u_out |q|·|o|);
      check:   float64 arithmetic, covered by the slack of the s@w tolerance's evaluation.
    """
    from .checks import (_finish, default_gemm_roundoff, gamma, softmax_bounds_tolerance,
                         softmax_row_stats, unit_roundoff)
    stats = softmax_row_stats(logits, weights, w_table)
    tol = softmax_bounds_tolerance(stats, weights.dtype, logits.shape[-1])
    if scale is None:
        s: torch.Tensor | float = 1.0
    elif isinstance(scale, torch.Tensor):
        s = 1.0 / scale.to(torch.float64) if divide else scale.to(torch.float64)
    else:
        s = 1.0 / float(scale) if divide else float(scale)
    q64, o64 = q.to(torch.float64), o.to(torch.float64)
    w_abs_v = torch.matmul(weights.to(torch.float64).abs(), v.to(torch.float64).abs())
    p_abs = (q64.abs() * w_abs_v).sum(-1)
    s_abs = abs(s) if isinstance(s, float) else s.abs()
    _, u_acc = default_gemm_roundoff(o.dtype)
    u_out = unit_roundoff(o.dtype)
    n, d = logits.shape[-1], q.shape[-1]
    # Near underflow a rounding errs absolutely: n products of the output GEMM may flush to
    # zero (fp32 accumulator's smallest normal each) and o itself by its dtype's smallest normal.
    underflow = q64.abs().sum(-1) * (n * torch.finfo(torch.float32).tiny
                                     + torch.finfo(o.dtype).tiny)
    extra = (s_abs * ((gamma(d, u_acc) + gamma(n, u_acc)) * p_abs
                      + u_out * (q64.abs() * o64.abs()).sum(-1) + underflow)
             + gamma(3, u_out) * stats["m1"])
    eps = stats["a_star"] - s * (q64 * o64).sum(-1)
    lower = torch.maximum(stats["lower1"], stats["middle"])
    upper = torch.minimum(stats["upper1"], stats["upper2"])
    violation = torch.maximum(lower - eps, eps - upper).clamp(min=0)
    nonfinite = stats["nonfinite"] | ~torch.isfinite(eps)
    return _finish(violation, tol + extra, nonfinite, stats["checkable"])
