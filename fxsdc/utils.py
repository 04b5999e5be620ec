"""Debugging helpers under the seed's names: logging switches, NaN checks, bound diagnostics, top-2.

Everything here logs through the ``fxsdc`` logger. ``check_nan`` and ``hist_tensor_diff`` read
tensor values on the host (they are for analysis scripts, never for the runtime graph);
``top2`` is pure tensor code and is also used by the runtime checks.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Mapping

import torch

logger = logging.getLogger("fxsdc")

_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def enable_debug(flag: bool = True) -> None:
    """Log DEBUG messages of the ``fxsdc`` logger to stderr (``flag=False``: back to WARNING)."""
    logger.setLevel(logging.DEBUG if flag else logging.WARNING)
    if flag and not any(type(h) is logging.StreamHandler for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(_FORMAT))
        logger.addHandler(handler)


def enable_log_file(path: str | Path) -> logging.FileHandler:
    """Also write the ``fxsdc`` log to ``path`` (appending); a second call for one path is a no-op."""
    path = Path(path).resolve()
    for h in logger.handlers:
        if isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path:
            return h
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(_FORMAT))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)  # a file that records nothing would surprise
    return handler


def check_nan(tensor: torch.Tensor, name: str = "tensor") -> bool:
    """Return True when ``tensor`` holds a NaN or an Inf, and log how many of each (host sync)."""
    if not tensor.is_floating_point():
        return False
    n_nan = int(torch.isnan(tensor).sum())
    n_pinf = int(torch.isposinf(tensor).sum())
    n_ninf = int(torch.isneginf(tensor).sum())
    bad = n_nan + n_pinf + n_ninf > 0
    if bad:
        logger.warning("%s: %d NaN, %d +Inf, %d -Inf of %d values", name, n_nan, n_pinf, n_ninf,
                       tensor.numel())
    else:
        logger.debug("%s: all %d values finite", name, tensor.numel())
    return bad


def _summary(x: torch.Tensor, bins: int) -> dict[str, Any]:
    x = x.detach().to(torch.float64).flatten().cpu()
    if x.numel() == 0:
        return {"count": 0}
    q = torch.quantile(x, torch.tensor([0.01, 0.5, 0.99], dtype=torch.float64))
    lo, hi = float(x.min()), float(x.max())
    hist = torch.histc(x, bins=bins, min=lo, max=hi if hi > lo else lo + 1.0)
    return {
        "count": x.numel(), "min": lo, "p01": float(q[0]), "median": float(q[1]),
        "p99": float(q[2]), "max": hi, "mean": float(x.mean()),
        "negative": int((x < 0).sum()),
        "hist": [int(c) for c in hist], "hist_range": (lo, hi),
    }


def _format(name: str, s: dict[str, Any], width: int = 40) -> str:
    if s["count"] == 0:
        return f"{name}: no rows"
    lines = [f"{name}: n={s['count']} min={s['min']:.4g} median={s['median']:.4g} "
             f"p99={s['p99']:.4g} max={s['max']:.4g} negative={s['negative']}"]
    top = max(s["hist"]) or 1
    lo, hi = s["hist_range"]
    step = (hi - lo) / len(s["hist"]) if hi > lo else 0.0
    for i, c in enumerate(s["hist"]):
        lines.append(f"  {lo + i * step:>11.4g} | {'#' * math.ceil(width * c / top):<{width}} {c}")
    return "\n".join(lines)


def hist_tensor_diff(d: Mapping[str, Any], bins: int = 10) -> dict[str, dict[str, Any]]:
    """Summarise the tightness of attention bounds from ``BoundsResult.to_dict()``.

    Uses the rows where ``valid_mask`` is True (all rows if absent) and reports, for each quantity
    present: ``epsilon``; ``gap`` = upper - lower; ``margin_lower`` = epsilon - lower and
    ``margin_upper`` = upper - epsilon (a negative margin is a violated bound). Each summary has
    count, min, p01, median, p99, max, mean, the number of negative values and a histogram; the
    text form is logged at INFO. Returns ``{name: summary}``.
    """
    def get(key: str) -> torch.Tensor | None:
        v = d.get(key)
        return None if v is None else torch.as_tensor(v).detach().to(torch.float64).cpu()

    eps, lower, upper = get("epsilon"), get("lower"), get("upper")
    valid = get("valid_mask")
    quantities: dict[str, torch.Tensor] = {}
    if eps is not None:
        quantities["epsilon"] = eps
    if lower is not None and upper is not None:
        quantities["gap"] = upper - lower
    if eps is not None and lower is not None:
        quantities["margin_lower"] = eps - lower
    if eps is not None and upper is not None:
        quantities["margin_upper"] = upper - eps
    out: dict[str, dict[str, Any]] = {}
    for name, x in quantities.items():
        keep = torch.isfinite(x)
        if valid is not None:
            keep &= valid.bool()
        out[name] = _summary(x[keep], bins)
        logger.info("%s", _format(name, out[name]))
    return out


def top2(x: torch.Tensor, dim: int = -1,
         mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The two largest values along ``dim`` and their indices, largest first (the seed's return_top2).

    Returns ``(values, indices)`` with size 2 along ``dim``. With ``mask`` (True = keep,
    broadcastable to ``x``) masked entries count as -inf, so ``values[..., 0] - values[..., 1]``
    is the softmax margin gamma over the valid keys; a row with fewer than two valid entries gets
    -inf in the missing places. Pure tensor code (``torch.compile`` friendly).
    """
    if mask is not None:
        x = torch.where(mask, x, torch.full((), -math.inf, dtype=x.dtype, device=x.device))
    size = x.shape[dim]
    if size < 2:  # static shape: pad so topk(2) exists; the padding is -inf, index -1
        pad_shape = list(x.shape)
        pad_shape[dim] = 2 - size
        x = torch.cat([x, x.new_full(pad_shape, -math.inf)], dim=dim)
        values, indices = torch.topk(x, 2, dim=dim)
        return values, torch.where(indices >= size, torch.full_like(indices, -1), indices)
    return torch.topk(x, 2, dim=dim)
