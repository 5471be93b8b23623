"""NF4 dequantisation from the format's definition, in float64: the reference for lorakit and a check
on bitsandbytes.

bitsandbytes' bytes and scales are checked against lorakit bit for bit, but its CPU
`dequantize_4bit` is not a reference: 0.50.2 returns wrong values from the third 64-value block on
with the kernel it picks on CPUs with AVX-512 BF16. The values here come from the packed codes and
scales alone: level * block scale, where every product of two fp32 numbers is exact in float64 and
is rounded once to fp32 (the format's compute dtype), then to the weight's dtype.
"""
import math
import warnings

import torch

NESTED_BLOCKSIZE = 256  # bitsandbytes' block for the double-quantised scales


class BitsandbytesDequantisationWrong(UserWarning):
    """bitsandbytes' own dequantisation disagrees with the NF4 formula on this machine."""


def _fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32).to(torch.float64)


def block_scales(state) -> torch.Tensor:
    """The fp32 scale of every block, in float64, from a bitsandbytes QuantState."""
    if state.state2 is None:
        return state.absmax.to(torch.float64)
    s2 = state.state2
    nested = s2.absmax.to(torch.float64).repeat_interleave(NESTED_BLOCKSIZE)[:state.absmax.numel()]
    scaled = _fp32(s2.code.to(torch.float64)[state.absmax.long()] * nested)
    return _fp32(scaled + float(state.offset))


def dequantize(packed: torch.Tensor, state) -> torch.Tensor:
    """The weight that `packed` codes (two per byte, high nibble first) and `state`'s scales define."""
    n, bs = math.prod(state.shape), state.blocksize
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 15], dim=1).reshape(-1)[:n].long()
    levels = state.code.to(torch.float64)[codes]
    scales = block_scales(state).repeat_interleave(bs)[:n]
    return _fp32(levels * scales).to(state.dtype).reshape(state.shape)


def check_bitsandbytes(expected: torch.Tensor, theirs: torch.Tensor, where: str, tol: float = 0.0) -> None:
    """Warn (never fail) where bitsandbytes' values differ from the formula's by more than `tol`
    (relative and absolute; 0 compares exactly, e.g. raw bits)."""
    wrong = ((expected.double() - theirs.double()).abs() > tol * (1 + expected.double().abs())).sum().item()
    if wrong:
        warnings.warn(BitsandbytesDequantisationWrong(
            f"bitsandbytes differs from the NF4 formula in {wrong} of {expected.numel()} values "
            f"({where}); lorakit is checked against the formula"), stacklevel=2)
