"""IEEE-754 bit math: which bits a dtype has, what they mean, and flipping them in tensors.

A flip XORs the float's storage bits with a mask, through an integer view of the same width, so
the result is exact: no arithmetic touches the value.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .errors import UserError


@dataclass(frozen=True)
class FloatLayout:
    """Bit fields of one floating-point format, bit 0 being the least significant."""

    width: int
    exponent_bits: int
    int_dtype: torch.dtype

    @property
    def mantissa_bits(self) -> int:
        return self.width - 1 - self.exponent_bits

    def field(self, bit: int) -> str:
        if bit == self.width - 1:
            return "sign"
        return "exponent" if bit >= self.mantissa_bits else "mantissa"


LAYOUTS: dict[torch.dtype, FloatLayout] = {
    torch.float64: FloatLayout(64, 11, torch.int64),
    torch.float32: FloatLayout(32, 8, torch.int32),
    torch.float16: FloatLayout(16, 5, torch.int16),
    torch.bfloat16: FloatLayout(16, 8, torch.int16),
}

DTYPE_NAMES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def layout(dtype: torch.dtype) -> FloatLayout:
    try:
        return LAYOUTS[dtype]
    except KeyError:
        raise UserError(f"cannot flip bits of {dtype}: supported dtypes are "
                        f"{', '.join(DTYPE_NAMES)}") from None


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPE_NAMES[name]
    except KeyError:
        raise UserError(f"unknown dtype {name!r}; choose from {', '.join(DTYPE_NAMES)}") from None


def check_bits(bits: Iterable[int], dtype: torch.dtype) -> tuple[int, ...]:
    """Validate bit positions for ``dtype``; returns them sorted and de-duplicated."""
    width = layout(dtype).width
    bits = tuple(sorted(set(int(b) for b in bits)))
    if not bits:
        raise UserError("no bit given to flip")
    bad = [b for b in bits if not 0 <= b < width]
    if bad:
        raise UserError(f"bit {bad[0]} is out of range for {str(dtype).removeprefix('torch.')}: "
                        f"valid bits are 0-{width - 1}")
    return bits


def xor_mask(bits: Iterable[int], dtype: torch.dtype) -> int:
    """The XOR mask for ``bits`` as a signed integer of the dtype's width (two's complement),
    so that it converts exactly to the matching integer dtype."""
    width = layout(dtype).width
    mask = 0
    for b in check_bits(bits, dtype):
        mask |= 1 << b
    return mask - (1 << width) if mask >= 1 << (width - 1) else mask


def flip_bits(values: torch.Tensor, mask: torch.Tensor | int) -> torch.Tensor:
    """Return ``values`` with their storage bits XORed by ``mask`` (broadcast), out of place."""
    int_dtype = layout(values.dtype).int_dtype
    if isinstance(mask, int):
        mask = torch.tensor(mask, dtype=int_dtype, device=values.device)
    return (values.view(int_dtype) ^ mask.to(int_dtype)).view(values.dtype)


def flip_value(value: float, bits: Iterable[int], dtype: torch.dtype) -> float:
    """The float obtained by flipping ``bits`` of ``value`` stored as ``dtype`` (host helper)."""
    t = torch.tensor([value], dtype=dtype)
    return float(flip_bits(t, xor_mask(bits, dtype))[0])
