"""Fault models and the host side of injection.

Two APIs:

- :class:`FaultController` drives the injection nodes of an instrumented graph: it validates
  faults against the sites, writes the fault table into the module's buffers in place (so a
  compiled module does not recompile) and reads back what was applied, once per forward pass.
- :class:`FaultInjector` keeps the seed project's tensor-level API:
  ``FaultInjector(InjectionConfig(...)).inject(tensor)`` flips bits of a tensor in place and
  returns what it did; single- and multi-bit, random location, probabilistic, with a history.
"""
from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from passes.insert_injection import BUFFER_PREFIX, SiteInfo, fault_buffers

from .bits import check_bits, flip_bits, layout, parse_dtype, xor_mask
from .errors import UserError
from .runtime import packs_mask, random_hits, select_word


class InjectionLocation(str, enum.Enum):
    """Where in attention a fault lands (the seed's names)."""

    Q = "q"  # per-head query projection, (B, H, T, D)
    K = "k"  # per-head key projection
    V = "v"  # per-head value projection
    SCORES = "scores"  # scaled q·kᵀ before masking, (B, H, T, T)
    WEIGHTS = "weights"  # softmax output
    OUT = "out"  # weights·v before the heads merge, (B, H, T, D)

    @classmethod
    def parse(cls, value: "str | InjectionLocation") -> "InjectionLocation":
        try:
            return cls(value.value if isinstance(value, cls) else str(value).lower())
        except ValueError:
            raise UserError(f"unknown location {value!r}; choose from "
                            f"{', '.join(m.value for m in cls)}") from None


@dataclass(frozen=True)
class Fault:
    """One fault: flip ``bits`` of the element at ``index`` = (b, h, i, j) of a site."""

    layer: int
    location: str
    index: tuple[int, ...]
    bits: tuple[int, ...]


def parse_index(text: str) -> tuple[int, ...]:
    """``"0,1,2,3"`` -> (0, 1, 2, 3); a clear error for anything else."""
    try:
        return tuple(int(part) for part in text.replace(" ", "").split(","))
    except ValueError:
        raise UserError(f"index {text!r} is not a comma-separated list of integers") from None


class FaultController:
    """Host-side control of the injection nodes of an instrumented GraphModule."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.sites: list[SiteInfo] = gm.meta["fxsdc_sites"]
        self.fault_model: str = gm.meta["fxsdc_fault_model"]
        self._by_key = {(s.layer, s.location): s for s in self.sites}
        self._armed: list[tuple[Fault, int]] = []  # (fault, its slot in the table)

    # -- validation ---------------------------------------------------------------------------
    def site(self, layer: int, location: str) -> SiteInfo:
        location = InjectionLocation.parse(location).value
        try:
            return self._by_key[(layer, location)]
        except KeyError:
            layers = sorted({s.layer for s in self.sites})
            raise UserError(f"no instrumented site at layer {layer}, location {location!r} "
                            f"(instrumented layers: {layers}, locations: "
                            f"{sorted({s.location for s in self.sites})})") from None

    def validate(self, fault: Fault, batch_size: int, seq_len: int) -> SiteInfo:
        site = self.site(fault.layer, fault.location)
        check_bits(fault.bits, parse_dtype(site.dtype))
        shape = (batch_size,) + site.shape_for(seq_len)
        if len(fault.index) != len(shape) or any(
                not 0 <= i < d for i, d in zip(fault.index, shape)):
            raise UserError(f"index {tuple(fault.index)} is outside the {site.location} tensor of "
                            f"layer {site.layer}, shape {shape} (batch, ...)")
        return site

    def random_fault(self, layer: int, location: str, bits: Sequence[int], batch_index: int,
                     seq_len: int, generator: torch.Generator) -> Fault:
        """A fault at a uniformly random element of sample ``batch_index`` of a site."""
        site = self.site(layer, location)
        shape = site.shape_for(seq_len)
        flat = int(torch.randint(0, math.prod(shape), (1,), generator=generator))
        index = []
        for size in reversed(shape):
            index.append(flat % size)
            flat //= size
        return Fault(layer, site.location, (batch_index, *reversed(index)), tuple(bits))

    # -- the fault table ----------------------------------------------------------------------
    @property
    def slots(self) -> int:
        """How many faults one forward pass can carry (the fault table's length)."""
        return getattr(self.gm, BUFFER_PREFIX + "mask").shape[0]

    def _write(self, table: dict[str, torch.Tensor]) -> None:
        """Copy ``table`` into the module's buffers in place: with an unchanged number of slots a
        compiled module sees the same tensors and does not recompile."""
        device = getattr(self.gm, BUFFER_PREFIX + "mask").device
        for name, value in table.items():
            attr = BUFFER_PREFIX + name
            current = getattr(self.gm, attr)
            if current.shape == value.shape:
                current.copy_(value)
            else:  # the table grew: new buffers (a compiled module recompiles once)
                self.gm.register_buffer(attr, value.to(device))

    def _table(self, n: int) -> dict[str, torch.Tensor]:
        return fault_buffers(max(n, self.slots), self.fault_model, len(self.sites))

    def set_faults(self, faults: Iterable[Fault], batch_size: int, seq_len: int) -> None:
        """Arm ``faults`` for the next forward passes on inputs of ``batch_size`` x ``seq_len``.
        Faults in different batch elements are independent trials; the table grows if there
        are more faults than slots."""
        if self.fault_model != "bitflip":
            raise UserError("this module was instrumented for probabilistic faults; "
                            "use set_random()")
        faults = list(faults)
        # Faults on the same element share one slot, their masks XORed: flips compose.
        slot_of: dict[tuple[int, int], int] = {}  # (site, flat offset) -> slot
        entries: list[list[int]] = []  # [site, flat offset, mask]
        armed = []
        for fault in faults:
            site = self.validate(fault, batch_size, seq_len)
            offset = fault.index[0]
            for i, size in zip(fault.index[1:], site.shape_for(seq_len)):
                offset = offset * size + i
            key = (site.site_id, offset)
            mask = xor_mask(fault.bits, parse_dtype(site.dtype))
            if key in slot_of:
                entries[slot_of[key]][2] ^= mask
            else:
                slot_of[key] = len(entries)
                entries.append([*key, mask])
            armed.append((fault, slot_of[key]))
        table = self._table(len(entries))
        for f, (site_id, offset, mask) in enumerate(entries):
            site = self.sites[site_id]
            numel = batch_size * math.prod(site.shape_for(seq_len))
            packed = packs_mask(parse_dtype(site.dtype), numel)
            table["word"][site_id, f] = select_word(offset, mask, packed)
            table["mask"][f] = mask
        self._write(table)
        self._armed = armed

    def set_random(self, layer: int, location: str, rates: Sequence[float],
                   seeds: Sequence[int], bits: Sequence[int] | None = None) -> None:
        """Probabilistic faults: batch element b has each element of the site hit with
        probability ``rates[b]``, drawn from ``seeds[b]``; ``bits`` fixes the flipped bits
        (default: one random bit per hit element)."""
        if self.fault_model != "probabilistic":
            raise UserError("this module was instrumented for bit-flip faults; use set_faults()")
        site = self.site(layer, location)
        if any(not 0.0 <= r <= 1.0 for r in rates):
            raise UserError("bit-error rates must lie in [0, 1]")
        n = len(rates)
        table = self._table(n)
        table["site"][:n] = site.site_id
        table["batch"][:n] = torch.arange(n)
        table["rate"][:n] = torch.tensor(list(rates), dtype=torch.float64)
        table["seed"][:n] = torch.tensor(list(seeds), dtype=torch.int64)
        if bits:
            table["mask"][:n] = xor_mask(bits, parse_dtype(site.dtype))
        self._write(table)
        self._armed = [(Fault(layer, site.location, (b,), tuple(bits or ())), b)
                       for b in range(n)]

    def clear(self) -> None:
        """Switch every fault off (the table keeps its number of slots)."""
        self._write(self._table(0))
        self._armed = []

    def applied(self) -> list[dict[str, Any]]:
        """What the last forward pass applied: one record per armed fault with its site, index,
        bits and the value before and after (NaN if the site was not reached); probabilistic
        faults give the number of flips. Reads the device once."""
        if self.fault_model != "bitflip":
            count = getattr(self.gm, BUFFER_PREFIX + "count").cpu().tolist()
            return [{"layer": f.layer, "location": f.location, "batch": f.index[0],
                     "flips": count[i]} for f, i in self._armed]
        before = getattr(self.gm, BUFFER_PREFIX + "before").cpu().tolist()
        after = getattr(self.gm, BUFFER_PREFIX + "after").cpu().tolist()
        return [{"layer": f.layer, "location": f.location, "index": list(f.index),
                 "bits": list(f.bits), "before": before[i], "after": after[i]}
                for f, i in self._armed]


# -- the seed's tensor-level API ----------------------------------------------------------------
@dataclass
class InjectionConfig:
    """The seed's injection config. ``idx=None`` picks a random element (seeded); ``bits`` gives
    a multi-bit flip; ``probability`` switches to probabilistic injection (each element hit with
    that probability, flipping ``bit``)."""

    location: InjectionLocation | str = InjectionLocation.SCORES
    idx: tuple[int, ...] | None = None
    bit: int = 30
    enabled: bool = True
    bits: tuple[int, ...] | None = None
    probability: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        self.location = InjectionLocation.parse(self.location)
        if self.probability is not None and not 0.0 <= self.probability <= 1.0:
            raise UserError("probability must lie in [0, 1]")

    @property
    def flip_bits(self) -> tuple[int, ...]:
        return tuple(self.bits) if self.bits else (self.bit,)


@dataclass
class FaultInjector:
    """Flip bits of tensors in place, as the seed's injector did, keeping a history."""

    config: InjectionConfig
    history: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._generator = torch.Generator().manual_seed(self.config.seed)

    def inject(self, tensor: torch.Tensor) -> dict[str, Any]:
        """Apply the configured fault to ``tensor`` (in place) and return what was done."""
        cfg = self.config
        info: dict[str, Any] = {"location": cfg.location.value, "enabled": cfg.enabled,
                                "bits": list(cfg.flip_bits)}
        if not cfg.enabled:
            self.history.append(info)
            return info
        bits = check_bits(cfg.flip_bits, tensor.dtype)
        mask = xor_mask(bits, tensor.dtype)
        if cfg.probability is not None:
            seed = int(torch.randint(0, 2 ** 31, (1,), generator=self._generator))
            hit, _ = random_hits(tensor.numel(), torch.tensor([seed]),
                                 torch.tensor([cfg.probability]), layout(tensor.dtype).width,
                                 torch.device("cpu"))
            where = torch.unravel_index(hit[0].nonzero().flatten(), tensor.shape)
            tensor[where] = flip_bits(tensor[where], mask)
            info.update(mode="probabilistic", probability=cfg.probability,
                        flips=int(where[0].numel()), seed=seed)
        else:
            idx = cfg.idx
            if idx is None:
                flat_pos = int(torch.randint(0, tensor.numel(), (1,), generator=self._generator))
                idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat_pos),
                                                                tensor.shape))
            if len(idx) != tensor.dim() or any(not 0 <= i < d for i, d in zip(idx, tensor.shape)):
                raise UserError(f"index {tuple(idx)} is outside a tensor of shape "
                                f"{tuple(tensor.shape)}")
            before = tensor[idx].clone()
            tensor[idx] = flip_bits(before, mask)
            info.update(mode="bitflip", idx=list(idx), value_before=float(before),
                        value_after=float(tensor[idx]))
        self.history.append(info)
        return info
