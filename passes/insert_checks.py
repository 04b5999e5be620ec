"""Check insertion: put online detector nodes at each attention site.

Each check reads the values that downstream ops actually consume (after any injection node) and
compares them with an independent computation from the producing op's inputs (DESIGN section 4):

- ``bounds``  — ε from (logits, weights) lies within the Lambert-W bounds (seed's "s@w");
- ``softmax`` — weight rows, and their absolute values, sum to 1 (so weights lie in [0, 1]);
- ``abft``    — checksums of q·kᵀ (against the consumed scaled scores), weights·v (against the
  consumed output), and of the q/k/v and output projections per head;
- ``bounds-qo`` — the seed's "q@o" path, ε = a* − s·q·o, only where K = V (the pass verifies it
  on the example input; :func:`fxsdc.pipeline.instrument` can force it); ``comb`` inserts both
  bounds checks and a detector reads "comb" as either flagging.

A check is two nodes: a pure score function from :mod:`fxsdc.checks` (row flagged iff
score > 1) and :func:`fxsdc.runtime.record_check`, which accumulates rows checked, rows flagged,
the largest score, the first flagged row and flagged rows per sample into device buffers. Nothing
is read on the host inside forward.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from fxsdc import checks as check_math
from fxsdc import runtime
from fxsdc.bounds import lambertw_table

from .graph_utils import clone_graph_module, insert_buffer_reads
from .match_attention import LOCATIONS, AttentionSite, is_tensor, match_attention

CHECKS = ("bounds", "softmax", "abft", "bounds-qo", "comb")
DEFAULT_CHECKS = ("bounds", "softmax", "abft")  # the q@o paths need K = V
LOGITS_CHECKS = frozenset({"bounds", "bounds-qo", "softmax"})  # those that read the logits
STATE_PREFIX = "fxsdc_check_"
W_TABLE = "fxsdc_lambertw"
W_TABLE_KEYS = 1 << 16  # rows of up to 65536 keys


@dataclass(frozen=True)
class CheckInfo:
    """One inserted check: which layer, which check, on which op."""

    check_id: int
    layer: int
    check: str  # bounds, softmax, abft
    op: str  # softmax, qk, pv, q_proj, k_proj, v_proj, out_proj
    node: str  # the inserted score node

    def to_dict(self) -> dict:
        return asdict(self)


def state_buffers(num_checks: int, samples: int, device: torch.device | str = "cpu"
                  ) -> dict[str, torch.Tensor]:
    """Fresh detector state for ``num_checks`` checks and up to ``samples`` samples per pass."""
    return {"rows": torch.zeros(num_checks, 2, dtype=torch.int64, device=device),
            "max": torch.zeros(num_checks, dtype=torch.float64, device=device),
            "first": torch.full((num_checks,), -1, dtype=torch.int64, device=device),
            "samples": torch.zeros(num_checks, samples, dtype=torch.int64, device=device)}


def projection_params(gm: fx.GraphModule, proj: fx.Node) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                 fx.Node]:
    """(weight as [K, N], bias, input node) of a projection: nn.Linear or addmm (GPT-2 Conv1D).
    The tensors share the module's storage."""
    if proj.op == "call_module":
        linear = gm.get_submodule(str(proj.target))
        assert isinstance(linear, nn.Linear)
        return linear.weight.detach().T, (None if linear.bias is None else linear.bias.detach()), \
            proj.args[0]
    if proj.target is torch.addmm:
        bias, x, weight = proj.args[:3]
        fetch = lambda n: gm.get_parameter(str(n.target)).detach()  # noqa: E731
        return fetch(weight), fetch(bias), x
    raise NotImplementedError(f"ABFT for projection {proj.format_node()}")


ColumnValues = Callable[[torch.Tensor], torch.Tensor]  # column indices -> probe values


class _Probe(fx.Interpreter):
    """Run the graph with each projection's output replaced by a probe, capturing the per-head
    tensors: it shows which output columns (and which constant scale) reach each head."""

    def __init__(self, gm: fx.GraphModule, probes: dict[fx.Node, ColumnValues],
                 capture: set[fx.Node], device: torch.device) -> None:
        super().__init__(gm)
        self.probes, self.capture, self.values, self.device = probes, capture, {}, device

    def run_node(self, n: fx.Node):
        if n in self.probes:
            meta = n.meta["tensor_meta"]
            columns = torch.arange(meta.shape[-1], device=self.device)
            values = self.probes[n](columns).to(meta.dtype)
            return values.expand(meta.shape).contiguous()
        result = super().run_node(n)
        if n in self.capture:
            self.values[n] = result
            if len(self.values) == len(self.capture):
                raise _ProbeDone
        return result


class _ProbeDone(Exception):
    pass


def _probe(gm: fx.GraphModule, example: dict[str, torch.Tensor], projections: list[fx.Node],
           heads: list[fx.Node], values: ColumnValues) -> dict[fx.Node, torch.Tensor]:
    device = next(iter(example.values())).device
    interp = _Probe(gm, {p: values for p in projections}, set(heads), device)
    placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    with torch.no_grad():
        try:
            interp.run(*(example[p] for p in placeholders))
        except _ProbeDone:
            pass
    return interp.values


def head_columns(gm: fx.GraphModule, example: dict[str, torch.Tensor],
                 pairs: list[tuple[fx.Node, fx.Node]]) -> list[tuple[torch.Tensor, float]]:
    """For each (projection, per-head node) pair: the projection's output columns feeding each
    head, as an [H, D] index tensor, and the constant the model scales them by on the way."""
    projections = [p for p, _ in pairs]
    heads = [h for _, h in pairs]
    ones = _probe(gm, example, projections, heads, torch.ones_like)
    # Column indices go through the model in its own dtype, times a constant scale: send them
    # as base-b digits, b * u <= 1/4, so that a digit survives a rounded scaling (relative error
    # u) and division by the scale rounds back to it (bfloat16: b = 64, two probes for 4096
    # columns; float32: b = 2^22, one probe).
    widest = max(p.meta["tensor_meta"].shape[-1] for p in projections)
    u = max(torch.finfo(p.meta["tensor_meta"].dtype).eps / 2 for p in projections)
    base = min(2**22, int(1 / (4 * u)))
    digits = []
    while not digits or base ** len(digits) < widest:
        power = base ** len(digits)
        digits.append(_probe(gm, example, projections, heads,
                             lambda c, power=power: (c // power % base).double()))
    result = []
    for proj, head in pairs:
        scale_t = ones[head].double()  # [B, H, T, D]
        scale = float(scale_t.flatten()[0])
        index = sum(torch.round(d[head].double() / scale) * base ** i for i, d in enumerate(digits))
        if not (torch.all(scale_t == scale) and torch.all(index == index[:1, :, :1, :])):
            raise NotImplementedError(f"{head.name} is not a fixed column selection of "
                                      f"{proj.name}")
        result.append((index[0, :, 0, :].long(), scale))
    return result


class KNotEqualV(ValueError):
    """The q@o bounds path needs K = V."""


def _require_k_equals_v(gm: fx.GraphModule, example: dict[str, torch.Tensor],
                        sites: list[AttentionSite]) -> None:
    """Check on the example input that the keys and values attention consumes are equal."""
    nodes = [n for s in sites for n in (s.qk.args[1], s.pv.args[1])]
    values = _probe(gm, example, [], nodes, torch.ones_like)
    for site in sites:
        k_t, v = values[site.qk.args[1]], values[site.pv.args[1]]
        if k_t.shape[-2:] != v.shape[-2:][::-1] or not torch.equal(k_t.transpose(-1, -2), v):
            raise KNotEqualV(f"the q@o bounds need K = V, and layer {site.layer} has K != V "
                             "(instrument with force_kv_equal=True, as the seed did)")


def _insert_terms(gm: fx.GraphModule, x: fx.Node, prefix: str, sums: dict[str, torch.Tensor],
                  terms: Callable = check_math.linear_checksum_terms) -> fx.Node:
    """Register the weights' column sums as buffers ``{prefix}_{name}`` and insert, right after
    ``x`` (or after the buffer reads, when ``x`` is a placeholder), the node computing
    ``terms`` of ``x`` with them (``check_math.linear_checksum_terms`` by default)."""
    for name, value in sums.items():
        gm.register_buffer(f"{prefix}_{name}", value.contiguous())
    reads = insert_buffer_reads(gm, [f"{prefix}_{name}" for name in sums])
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    with gm.graph.inserting_after(max([x, *reads], key=order.__getitem__)):
        return gm.graph.create_node("call_function", terms,
                                    (x, *reads), name=f"{prefix}_terms")


def store_checked_sites(gm: fx.GraphModule, site: AttentionSite) -> None:
    """Make a checked layer's compiled graph store the sites its checks read.

    The checks read the scores, the logits made from them and the weights in several loops over
    each row. Unstored, inductor recomputes each select (with the scaling and masking) in every
    one of them: measured on one compiled GPT-2 small layer at 4 x 256 on the CPU, the fused
    softmax and checks kernel took 62 ms, against 26 ms plus a 1 ms store of the scores. So the
    injection nodes of a checked layer store their flipped tensors (unchecked layers keep their
    selects inside the kernels that consume the sites; sites flipped in place are stored
    already), and scores without an injection node (a detector without faults) get a store node
    of their own (``runtime.stored_when_compiling``): without it, 12-layer GPT-2 small with all
    checks and no injection nodes measured +16.1 % (CI 14.5-18.1) against +13.7 % with them, in
    the same run (one layer: one 29 ms fused softmax and checks kernel)."""
    for location in LOCATIONS:
        node = site.consumed(location)
        if node.target is runtime.inject_bitflips and not node.kwargs.get("in_place"):
            node.kwargs = {**node.kwargs, "store": True}
    for location in ("scores", "weights"):
        node = site.node(location)
        if site.consumed(location) is not node or node is site.qk:  # a product: stored anyway
            continue
        with gm.graph.inserting_after(node):
            stored = gm.graph.call_function(runtime.stored_when_compiling, (node,),
                                            name=f"fxsdc_store_{location}_{site.layer}")
        stored.meta["tensor_meta"] = node.meta.get("tensor_meta")
        node.replace_all_uses_with(stored, delete_user_cb=lambda user: user is not stored)


def _path_nodes(start: fx.Node, end: fx.Node) -> list[fx.Node]:
    """The nodes on data paths from ``start`` to ``end`` (``end`` included, ``start`` not), in
    graph order."""
    order = {n: i for i, n in enumerate(start.graph.nodes)}
    reached, frontier = set(), [start]
    while frontier:  # forward from start, not past end
        for user in frontier.pop().users:
            if user not in reached and order[user] <= order[end]:
                reached.add(user)
                frontier.append(user)
    if end not in reached:
        return []
    path, frontier = {end}, [end]
    while frontier:  # back from end, within what start reaches
        for arg in frontier.pop().all_input_nodes:
            if arg in reached and arg not in path:
                path.add(arg)
                frontier.append(arg)
    return sorted(path, key=order.__getitem__)


def _is_bool_tensor(node: object) -> bool:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return getattr(meta, "dtype", None) == torch.bool


def _stored_reader(operand: fx.Node, logits: fx.Node
                   ) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """How the logits' copy reads a mask operand: bool tensors through a float32 copy, floating
    tensors smaller than the logits from a store of their own; others as they are (a single
    element, which inductor loads once per loop; one of the logits' size, which a store would
    copy whole)."""
    if _is_bool_tensor(operand):
        return runtime.stored_as_float
    meta, whole = operand.meta.get("tensor_meta"), logits.meta.get("tensor_meta")
    if (isinstance(meta, TensorMetadata) and isinstance(whole, TensorMetadata)
            and meta.dtype.is_floating_point and 1 < meta.shape.numel() < whole.shape.numel()):
        return runtime.stored_operand
    return None


def insert_check_logits(gm: fx.GraphModule, site: AttentionSite) -> fx.Node | None:
    """Insert, before the softmax, a node giving the site's logits recomputed under torch.compile
    from the consumed scores with each mask operand of the masking ops read from a store: a
    boolean one (a causal mask, say) as a float32 copy (``runtime.stored_as_float``), a floating
    one smaller than the logits (an additive attention mask) as it is (``runtime.stored_operand``);
    eagerly it is the logits node's value. None when there is no such operand, or when a module
    call is on the way from the scores to the logits.

    Inductor's C++ code expands a boolean mask element by element, and recomputes a small operand
    made from others (GPT-2's additive mask, from the int64 attention mask) in every element of
    the loop that reads it; stored, each is one load. The copy of the masking ops is a submodule,
    ``fxsdc_check_logits_{layer}``, called by ``runtime.recomputed_when_compiling``;
    ``store_logits`` stores what it gives.
    """
    scores = site.consumed("scores")
    path = _path_nodes(scores, site.logits)
    inputs = list(dict.fromkeys(a for n in path for a in n.all_input_nodes
                                if a not in path and a is not scores))
    readers = {a: _stored_reader(a, site.logits) for a in inputs}
    if not any(readers.values()):
        return None
    if any(n.op not in ("call_function", "call_method") for n in path):
        return None  # a module on the way (the copy would need it): the logits are stored as is
    copy = fx.Graph()
    env = {scores: copy.placeholder("scores")}
    for i, node in enumerate(inputs):
        env[node] = copy.placeholder(f"input_{i}")
        if readers[node] is not None:
            env[node] = copy.call_function(readers[node], (env[node],))
    for node in path:
        env[node] = copy.node_copy(node, env.__getitem__)
    copy.output(env[site.logits])
    name = f"fxsdc_check_logits_{site.layer}"
    gm.add_submodule(name, fx.GraphModule(nn.Module(), copy, class_name="CheckLogits"))
    with gm.graph.inserting_before(site.softmax):
        module = gm.graph.get_attr(name)
        return gm.graph.call_function(runtime.recomputed_when_compiling,
                                      (site.logits, module, scores, *inputs),
                                      name=f"{name}_values")


def store_logits(gm: fx.GraphModule, site: AttentionSite) -> fx.Node:
    """Make the softmax of a layer whose checks read its logits read them from a stored node
    (``runtime.stored_when_compiling``), computed by ``insert_check_logits``'s copy where there
    is one; return that node, which the checks read too (the softmax's input itself where it is a
    store already). Same values, bitwise.

    Unstored, inductor recomputes the scaling and masking in every loop over the logits: the
    softmax's two (its maximum, then the exponentials) and each check's; and the softmax's loops,
    indexed by the [B, T] and [T, T] masks, stay 4-d, while the checks' loops over the stored
    weights are flat, so inductor never runs them in one loop over rows. Stored, the masking is
    one pass and every later loop is flat. Measured on one compiled GPT-2 small layer at 4 x 256
    (CPU, one thread, paired loop timings): all loops outside the GEMMs 31.0 ms (the original's
    21.0) against 26.1 ms with the logits stored; the softmax itself 9.7 -> 2.2 ms, plus the
    1.8 ms masking pass.
    """
    current = site.softmax.args[0] if site.softmax.args else site.softmax.kwargs["input"]
    if current.target is runtime.stored_when_compiling:
        return current  # stored already: the scores, where no masking op comes between
    copy = insert_check_logits(gm, site)
    source = site.logits if copy is None else copy
    with gm.graph.inserting_before(site.softmax):
        stored = gm.graph.call_function(runtime.stored_when_compiling, (source,),
                                        name=f"fxsdc_store_logits_{site.layer}")
    stored.meta["tensor_meta"] = site.logits.meta.get("tensor_meta")
    site.softmax.replace_input_with(site.logits, stored)
    return stored


def insert_checks(gm: fx.GraphModule, example_inputs: dict[str, torch.Tensor], *,
                  checks: Sequence[str] = DEFAULT_CHECKS, layers: Sequence[int] | None = None
                  ) -> fx.GraphModule:
    """Return a copy of ``gm`` with the chosen checks at each chosen layer's attention.

    ``gm`` carries shape metadata (and may already hold injection nodes, which the checks read
    through). ``example_inputs`` run the graph once with probes, to learn which projection
    columns feed each head. The result has ``meta["fxsdc_checks"]`` (a list of
    :class:`CheckInfo`) and the detector state buffers ``fxsdc_check_*``.
    """
    unknown = [c for c in checks if c not in CHECKS]
    if unknown:
        raise ValueError(f"unknown check(s) {unknown}; choose from {CHECKS}")
    if "comb" in checks:
        checks = [c for c in checks if c != "comb"] + ["bounds", "bounds-qo"]
    gm = clone_graph_module(gm)
    attention = match_attention(gm)
    chosen = [attention[i] for i in (range(len(attention)) if layers is None else layers)]
    graph = gm.graph
    if "bounds-qo" in checks:
        _require_k_equals_v(gm, example_inputs, chosen)
    if "bounds" in checks or "bounds-qo" in checks:
        gm.register_buffer(W_TABLE, lambertw_table(W_TABLE_KEYS))
    example = next(n for n in graph.nodes if n.op == "placeholder" and is_tensor(n))
    batch = example.meta["tensor_meta"].shape[0]  # input_ids: (B, T)

    infos: list[CheckInfo] = []
    pending: list[tuple[fx.Node, int]] = []  # (score node, check id)

    def add(layer: int, check: str, op: str, after: fx.Node, fn, args: tuple,
            kwargs: dict | None = None) -> None:
        with graph.inserting_after(after):
            node = graph.create_node("call_function", fn, args, kwargs or {},
                                     name=f"fxsdc_{check}_{op}_{layer}")
        node.meta["fxsdc_check"] = (layer, check, op)
        pending.append((node, len(infos)))
        infos.append(CheckInfo(len(infos), layer, check, op, node.name))

    projections: list[tuple[AttentionSite, str]] = []
    for site in chosen:
        store_checked_sites(gm, site)
        weights = site.consumed("weights")
        logits = store_logits(gm, site) if LOGITS_CHECKS.intersection(checks) else site.logits
        if "bounds" in checks:
            (table,) = insert_buffer_reads(gm, [W_TABLE])
            add(site.layer, "bounds", "softmax", weights, check_math.softmax_bounds_score,
                (logits, weights, table))
        if "bounds-qo" in checks:
            (table,) = insert_buffer_reads(gm, [W_TABLE])
            out = site.consumed("out")
            add(site.layer, "bounds-qo", "softmax", out, runtime.qo_bounds_score,
                (logits, weights, site.qk.args[0], out, site.pv.args[1], table,
                 *(site.scale or (None, False))))
        if "softmax" in checks:
            add(site.layer, "softmax", "softmax", weights, check_math.softmax_sum_score,
                (weights, logits))
        if "abft" in checks:
            scores = site.consumed("scores")
            add(site.layer, "abft", "qk", scores, runtime.scores_checksum_score,
                (site.qk.args[0], site.qk.args[1], scores, *(site.scale or (None, False))))
            out = site.consumed("out")
            add(site.layer, "abft", "pv", out, check_math.matmul_checksum_score,
                (site.pv.args[0], site.pv.args[1], out))
            projections.extend((site, loc) for loc in ("q", "k", "v"))

    if projections:
        pairs = [(s.projection(loc), s.node(loc)) for s, loc in projections]
        # One terms GEMM per projection input (q, k and v of a layer read the same x), with the
        # heads' column sums of every projection reading it side by side.
        groups: dict[tuple[int, fx.Node], list] = {}
        for (site, loc), (columns, scale) in zip(projections, head_columns(gm, example_inputs,
                                                                           pairs)):
            weight, bias, x = projection_params(gm, site.projection(loc))
            groups.setdefault((site.layer, x), []).append((site, loc, columns, scale, weight,
                                                           bias))
        for (layer, x), members in groups.items():
            sums: dict[str, list[torch.Tensor]] = {"w_sum": [], "w_abs_sum": [], "b_sum": [],
                                                   "b_abs_sum": []}
            for _, _, columns, _, weight, bias in members:
                w = weight.double()[:, columns]  # [K, H, D]
                b = torch.zeros(columns.shape, dtype=torch.float64) if bias is None else \
                    bias.double()[columns]  # a missing bias adds exact zeros
                sums["w_sum"].append(w.sum(-1))
                sums["w_abs_sum"].append(w.abs().sum(-1))
                sums["b_sum"].append(b.sum(-1))
                sums["b_abs_sum"].append(b.abs().sum(-1))
            names = "".join(loc for _, loc, *_ in members)
            terms = _insert_terms(gm, x, f"fxsdc_abft_{names}_{layer}",
                                  {k: torch.cat(v, -1) for k, v in sums.items()})
            first = 0
            for site, loc, columns, scale, weight, bias in members:
                heads = site.consumed(loc)
                add(site.layer, "abft", f"{loc}_proj", heads, runtime.projection_checksum_score,
                    (terms, heads), {"columns": (first, first + columns.shape[0]),
                                     "in_features": weight.shape[0],
                                     "in_dtype": x.meta["tensor_meta"].dtype,
                                     "has_bias": bias is not None,
                                     "scale": None if scale == 1.0 else scale,
                                     "group_size": columns.shape[1]})
                first += columns.shape[0]
        for site in {s.layer: s for s, _ in projections}.values():
            if site.out_proj is None:
                continue
            weight, bias, x = projection_params(gm, site.out_proj)
            w = weight.double()
            b = torch.zeros(1, dtype=torch.float64) if bias is None else bias.double()
            in_dtype = x.meta["tensor_meta"].dtype
            # One group, all columns: row sums fused into the pass that produces x.
            w_e, wa_e, rounding = check_math.row_sum_weights(w.sum(-1), w.abs().sum(-1), in_dtype)
            prefix = f"fxsdc_abft_out_{site.layer}"
            terms = _insert_terms(gm, x, prefix,
                                  {"w_e": w_e, "wa_e": wa_e, "b_sum": b.sum().reshape(1),
                                   "b_abs_sum": b.abs().sum().reshape(1)},
                                  check_math.row_checksum_terms)
            # 1-d: dynamo makes a 0-dim buffer's value a symbolic float, and its guard then reads
            # it on the host in every call (12 ``.item()`` a forward on 12-layer GPT-2).
            gm.register_buffer(f"{prefix}_rounding", rounding.reshape(1))
            (rounding_read,) = insert_buffer_reads(gm, [f"{prefix}_rounding"])
            add(site.layer, "abft", "out_proj", site.out_proj, runtime.output_checksum_score,
                (terms, site.out_proj, rounding_read),
                {"in_features": weight.shape[0], "in_dtype": in_dtype,
                 "has_bias": bias is not None})

    for name, value in state_buffers(len(infos), batch).items():
        gm.register_buffer(STATE_PREFIX + name, value)
    state = insert_buffer_reads(gm, [STATE_PREFIX + n for n in ("rows", "max", "first",
                                                                "samples")])
    for score, check_id in pending:
        with graph.inserting_after(score):
            graph.create_node("call_function", runtime.record_check,
                              (score, check_id, example, *state), name=f"{score.name}_record")
    graph.lint()
    gm.recompile()
    gm.meta["fxsdc_checks"] = infos
    return gm
