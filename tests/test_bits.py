import struct

import pytest
import torch
from hypothesis import given, settings, strategies as st

from fxsdc.bits import check_bits, flip_bits, flip_value, layout, xor_mask
from fxsdc.errors import UserError


@settings(max_examples=200, deadline=None)
@given(st.floats(width=32, allow_nan=False), st.integers(0, 31))
def test_float32_flip_matches_ieee_bits(value, bit):
    raw = struct.unpack("<I", struct.pack("<f", value))[0] ^ (1 << bit)
    expected = struct.unpack("<f", struct.pack("<I", raw))[0]
    got = flip_value(value, [bit], torch.float32)
    assert struct.pack("<f", got) == struct.pack("<f", expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@given(bits=st.integers(0, 0xFFFF), bit=st.integers(0, 15))
@settings(max_examples=100, deadline=None)
def test_16bit_flip_xors_storage(dtype, bits, bit):
    value = torch.tensor([bits], dtype=torch.int32).to(torch.int16).view(dtype)
    flipped = flip_bits(value, xor_mask([bit], dtype))
    assert int(flipped.view(torch.int16).to(torch.int32) & 0xFFFF) == bits ^ (1 << bit)


def test_sign_bit_masks_are_twos_complement():
    assert xor_mask([31], torch.float32) == -(1 << 31)
    assert xor_mask([15], torch.bfloat16) == -(1 << 15)
    assert flip_value(1.0, [31], torch.float32) == -1.0
    assert flip_value(2.0, [15], torch.bfloat16) == -2.0


def test_multi_bit_flip_is_the_composition_of_single_flips():
    once = flip_value(flip_value(0.3, [3], torch.float32), [27], torch.float32)
    assert flip_value(0.3, [3, 27], torch.float32) == once


def test_fields():
    assert [layout(torch.float32).field(b) for b in (31, 30, 23, 22, 0)] == \
        ["sign", "exponent", "exponent", "mantissa", "mantissa"]
    assert [layout(torch.bfloat16).field(b) for b in (15, 7, 6)] == ["sign", "exponent", "mantissa"]
    assert [layout(torch.float16).field(b) for b in (15, 10, 9)] == ["sign", "exponent", "mantissa"]


@pytest.mark.parametrize("dtype,bit", [(torch.float32, 32), (torch.bfloat16, 16),
                                       (torch.float16, -1)])
def test_bit_out_of_range_is_a_user_error(dtype, bit):
    with pytest.raises(UserError, match="out of range"):
        check_bits([bit], dtype)
