"""4-bit NormalFloat (NF4) with double quantisation: QLoRA's storage for a frozen base weight.

A weight is cut into blocks of `blocksize` values (64); each block keeps its absolute maximum,
and each value becomes the index of the nearest of 16 NF4 levels after dividing by it. Two
indices share a byte, the first element in the high nibble. Double quantisation then stores
the block maxima themselves in 8 bits: their mean is subtracted (the offset), and the rest is
quantised in blocks of 256 with the signed 8-bit dynamic map and an fp32 maximum per block,
about 4.127 bits per parameter in all.

Everything here is bit-for-bit what bitsandbytes (0.50, on CPU) computes and stores, down to its
rounding quirks (noted where they are copied), so a weight quantised here loads in
bitsandbytes/transformers and back (`to_state_dict` / `from_state_dict`), without importing it.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass

import torch
from torch import Tensor

# The 16 NF4 levels: quantiles of N(0, 1), normalised to [-1, 1], with an exact zero (QLoRA, App. E).
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)
_NF4_MIDPOINTS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes accepts for 4-bit
NESTED_BLOCKSIZE = 256  # bitsandbytes always double-quantises the block maxima in blocks of 256
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_CHUNK = 1 << 20  # values per step: a multiple of every blocksize; bounds the fp32 temporaries


def dynamic_map() -> Tensor:
    """The signed 8-bit dynamic map (Dettmers, 2015): 256 sorted levels in [-1, 1], dense near 0.

    Level group e (e = 0..6) holds the 2**e midpoints of a linear grid on [0.1, 1], scaled by
    10**(e - 6), and their negatives; 0 and 1 complete the 256.
    """
    levels = [torch.tensor([0.0, 1.0])]
    for e in range(7):
        grid = torch.linspace(0.1, 1.0, 2**e + 1)
        mids = (grid[:-1] + grid[1:]) / 2 * 10.0 ** (e - 6)
        levels += [mids, -mids]
    return torch.cat(levels).sort().values


DYNAMIC_MAP = dynamic_map()


def _lookup_table(code: Tensor) -> Tensor:
    """bitsandbytes' CPU rounding for 8-bit codes: [-1, 1] cut into 65536 even steps, each step
    mapped to the code whose midpoint interval holds it (ties to the lower code)."""
    steps = torch.arange(65536, dtype=torch.float32) * 2.0 / 65535.0 - 1.0
    return torch.searchsorted((code[:-1] + code[1:]) * 0.5, steps).to(torch.uint8)


@functools.cache
def _dynamic_lut() -> Tensor:
    """The rounding table for DYNAMIC_MAP, built on first use (it is not needed to import lorakit)."""
    return _lookup_table(DYNAMIC_MAP)


@dataclass(eq=False)
class NF4Weight:
    """A weight in NF4. `absmax` is fp32 per block, or (double quantisation) uint8 codes into
    `nested_code`, scaled by `nested_absmax` per 256 blocks and shifted by `offset`."""

    data: Tensor  # uint8 [(numel + 1) // 2]: two 4-bit codes per byte, the first in the high nibble
    absmax: Tensor  # fp32 [blocks], or uint8 [blocks] when double-quantised
    shape: torch.Size
    dtype: torch.dtype  # the dtype the weight had, and dequantises to
    blocksize: int = 64
    nested_absmax: Tensor | None = None  # fp32 [ceil(blocks / 256)]
    nested_code: Tensor | None = None  # fp32 [256], the map the absmax codes index
    offset: float | None = None  # the mean block maximum (an fp32 value)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def quantize_nf4(weight: Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantise a float32/float16/bfloat16 weight to NF4, exactly as bitsandbytes.quantize_4bit
    (quant_type="nf4", compress_statistics=double_quant) does on CPU. It works through the weight
    in chunks, so the only full-size allocation is the packed result."""
    _check_weight(weight, blocksize)
    flat = weight.detach().reshape(-1)
    n = flat.numel()
    data = torch.empty((n + 1) // 2, dtype=torch.uint8, device=flat.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=flat.device)
    for start in range(0, n, _CHUNK):
        codes, scales = _quantize_chunk(flat[start:start + _CHUNK].float(), blocksize)
        data[start // 2:start // 2 + codes.numel()] = codes
        absmax[start // blocksize:start // blocksize + scales.numel()] = scales
    if not torch.isfinite(absmax).all():
        raise ValueError(f"weight of shape {tuple(weight.shape)} has NaN or infinite values; NF4 stores "
                         "finite numbers only")
    if not double_quant:
        return NF4Weight(data, absmax, weight.shape, weight.dtype, blocksize)
    offset = absmax.mean()
    codes, nested_absmax = _quantize_8bit(absmax - offset, NESTED_BLOCKSIZE)
    return NF4Weight(data, codes, weight.shape, weight.dtype, blocksize, nested_absmax,
                     DYNAMIC_MAP.to(flat.device), offset.item())


def empty_nf4(shape: torch.Size, dtype: torch.dtype, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """An NF4 weight's storage with no data (meta tensors of quantize_nf4's shapes; no offset yet): a skeleton
    that quantize_nf4's result fills later."""
    n, meta = math.prod(shape), torch.device("meta")
    blocks = -(-n // blocksize)
    if not double_quant:
        return NF4Weight(torch.empty((n + 1) // 2, dtype=torch.uint8, device=meta),
                         torch.empty(blocks, device=meta), torch.Size(shape), dtype, blocksize)
    return NF4Weight(torch.empty((n + 1) // 2, dtype=torch.uint8, device=meta),
                     torch.empty(blocks, dtype=torch.uint8, device=meta), torch.Size(shape), dtype, blocksize,
                     torch.empty(-(-blocks // NESTED_BLOCKSIZE), device=meta), torch.empty(256, device=meta))


def _check_weight(weight: Tensor, blocksize: int) -> None:
    if not isinstance(weight, Tensor):
        raise TypeError(f"quantize_nf4 takes a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in DTYPES.values():
        raise ValueError(f"NF4 quantises float32, float16 or bfloat16 weights, got {weight.dtype}")
    if weight.dim() == 0 or weight.numel() == 0:
        raise ValueError(f"NF4 cannot hold a weight of shape {tuple(weight.shape)}: it needs at least one "
                         "dimension and one value (the format stores one scale per block of values)")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")


def _quantize_chunk(x: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """fp32 values (whole blocks, then maybe one short block) -> packed codes and block maxima."""
    full = x.numel() - x.numel() % blocksize
    blocks = x[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    # As bitsandbytes does: whole blocks are multiplied by the reciprocal of their maximum; the short
    # last block is divided by it, and stores it clamped to >= 1e-38 (an all-zero one stores 1e-38).
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).view(-1)
    if full < x.numel():
        tail_max = x[full:].abs().amax().clamp(min=1e-38)
        scaled = torch.cat([scaled, x[full:] / tail_max])
        absmax = torch.cat([absmax, tail_max[None]])
    codes = torch.bucketize(scaled, _NF4_MIDPOINTS.to(x.device), out_int32=True)  # ties to the lower level
    if codes.numel() % 2:
        codes = torch.nn.functional.pad(codes, (0, 1), value=7)  # a padded 0.0, as bitsandbytes pads
    codes = codes.to(torch.uint8)
    return codes[0::2] << 4 | codes[1::2], absmax


def _quantize_8bit(x: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """bitsandbytes' CPU quantize_blockwise with the dynamic map: uint8 codes and fp32 block maxima."""
    n = x.numel()
    blocks = torch.nn.functional.pad(x, (0, -n % blocksize)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax)[:, None]).clamp(-1.0, 1.0)
    step = ((scaled + 1.0) * 0.5 * 65535.0 + 0.5).to(torch.int32).clamp_(0, 65535)  # NaN (0/0) -> 0
    codes = _dynamic_lut().to(x.device)[step]
    codes[absmax == 0] = 0  # an all-zero block stores code 0 (and maximum 0)
    return codes.view(-1)[:n], absmax


def block_absmax(q: NF4Weight) -> Tensor:
    """The fp32 scale of every block, undoing double quantisation if there is one."""
    if not q.double_quant:
        return q.absmax
    scales = q.nested_absmax.repeat_interleave(NESTED_BLOCKSIZE)[:q.absmax.numel()]
    offset = torch.tensor(q.offset, dtype=torch.float32, device=scales.device)
    return q.nested_code.to(scales.device)[q.absmax.long()] * scales + offset


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype | None = None) -> Tensor:
    """The weight NF4 stores, in `dtype` (default: the dtype it was quantised from), bit-for-bit
    what bitsandbytes.dequantize_4bit returns: level * block scale in fp32, then rounded."""
    n, bs, absmax = q.numel, q.blocksize, block_absmax(q)
    code = NF4_CODE.to(q.data.device)
    out = torch.empty(n, dtype=dtype or q.dtype, device=q.data.device)
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        packed = q.data[start // 2:(stop + 1) // 2]
        levels = code[torch.stack([packed >> 4, packed & 15], dim=1).view(-1).long()]
        levels = torch.nn.functional.pad(levels, (0, -levels.numel() % bs))  # whole blocks
        scaled = levels.view(-1, bs) * absmax[start // bs:][:levels.numel() // bs, None]
        out[start:stop] = scaled.view(-1)[:stop - start]
    return out.view(q.shape)


def bits_per_param(q: NF4Weight) -> float:
    """Storage per weight value: packed codes, block scales, and the nested scales and offset
    (the shared 16- and 256-entry code tables are not counted)."""
    bits = 8 * (q.data.numel() + q.absmax.numel() * q.absmax.element_size())
    if q.double_quant:
        bits += 32 * (q.nested_absmax.numel() + 1)
    return bits / q.numel


# --- the bitsandbytes / transformers checkpoint format -------------------------------------

_QS = "quant_state.bitsandbytes__nf4"


def to_state_dict(q: NF4Weight, prefix: str = "weight") -> dict[str, Tensor]:
    """The keys and tensors bitsandbytes' Linear4bit saves for this weight (`prefix` is the
    parameter's full name, e.g. 'model.layers.0.mlp.up_proj.weight')."""
    meta = {"quant_type": "nf4", "blocksize": q.blocksize, "dtype": str(q.dtype).removeprefix("torch."),
            "shape": list(q.shape)}
    # The code tables are copies: safetensors refuses tensors that share storage.
    sd = {prefix: q.data.view(-1, 1), f"{prefix}.absmax": q.absmax,
          f"{prefix}.quant_map": NF4_CODE.to(q.data.device, copy=True)}
    if q.double_quant:
        sd[f"{prefix}.nested_absmax"] = q.nested_absmax
        sd[f"{prefix}.nested_quant_map"] = q.nested_code.clone()
        meta.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=q.offset)
    sd[f"{prefix}.{_QS}"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    return sd


def from_state_dict(state_dict: dict[str, Tensor], prefix: str = "weight") -> NF4Weight:
    """Read an NF4 weight saved by bitsandbytes/transformers (or `to_state_dict`)."""
    def get(name: str, what: str) -> Tensor:
        key = f"{prefix}.{name}" if name else prefix
        if key not in state_dict:
            raise KeyError(f"{key!r} is missing: a 4-bit weight needs {what}")
        return state_dict[key]

    if f"{prefix}.quant_state.bitsandbytes__fp4" in state_dict:
        raise ValueError(f"{prefix!r} is stored as FP4; only NF4 is supported")
    meta = _read_meta(get(_QS, "its quant_state (JSON as uint8)"), f"{prefix}.{_QS}")
    shape, dtype, blocksize = meta["shape"], DTYPES[meta["dtype"]], meta["blocksize"]
    n = math.prod(shape)
    blocks = -(-n // blocksize)
    data = get("", "its packed codes")
    if data.dtype != torch.uint8:  # bitsandbytes' quant_storage may pack the bytes into another dtype
        data = data.contiguous().view(torch.uint8)
    _expect(data.reshape(-1), (n + 1) // 2, torch.uint8, prefix, f"{n} values, 2 per byte")
    quant_map = get("quant_map", "the NF4 code table")
    if not torch.equal(quant_map.cpu(), NF4_CODE):
        raise ValueError(f"{prefix}.quant_map is not the NF4 table; only NF4 is supported")
    absmax = get("absmax", "its block scales")
    nested_keys = [f"{prefix}.{k}" for k in ("nested_absmax", "nested_quant_map") if f"{prefix}.{k}" in state_dict]
    if "nested_offset" not in meta and not nested_keys:
        _expect(absmax, blocks, torch.float32, f"{prefix}.absmax", f"one fp32 scale per {blocksize} values")
        return NF4Weight(data.reshape(-1), absmax, torch.Size(shape), dtype, blocksize)
    what = "its nested scales (the quant_state says double quantisation)"
    nested_absmax, nested_code = get("nested_absmax", what), get("nested_quant_map", what)
    if "nested_offset" not in meta:
        raise ValueError(f"{prefix}.{_QS} lacks nested_offset, but {nested_keys} are present")
    if meta.get("nested_blocksize") != NESTED_BLOCKSIZE or meta.get("nested_dtype") != "float32":
        raise ValueError(f"{prefix}.{_QS}: nested_blocksize {meta.get('nested_blocksize')} and nested_dtype "
                         f"{meta.get('nested_dtype')!r} unsupported; bitsandbytes writes 256 and 'float32'")
    _expect(absmax, blocks, torch.uint8, f"{prefix}.absmax", f"one uint8 code per {blocksize} values")
    _expect(nested_absmax, -(-blocks // NESTED_BLOCKSIZE), torch.float32, f"{prefix}.nested_absmax",
            f"one fp32 scale per {NESTED_BLOCKSIZE} blocks")
    _expect(nested_code, 256, torch.float32, f"{prefix}.nested_quant_map", "the 8-bit code table")
    return NF4Weight(data.reshape(-1), absmax, torch.Size(shape), dtype, blocksize, nested_absmax,
                     nested_code, float(meta["nested_offset"]))


def _read_meta(tensor: Tensor, key: str) -> dict:
    try:
        meta = json.loads(bytes(tensor.cpu().to(torch.uint8).tolist()).decode())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{key} is not JSON bytes: {e}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{key} holds {type(meta).__name__} JSON, expected an object")
    for field in ("quant_type", "blocksize", "dtype", "shape"):
        if field not in meta:
            raise ValueError(f"{key} lacks {field!r} (has {sorted(meta)})")
    if meta["quant_type"] != "nf4":
        raise ValueError(f"{key}: quant_type {meta['quant_type']!r}; only 'nf4' is supported")
    if meta["blocksize"] not in BLOCKSIZES:
        raise ValueError(f"{key}: blocksize {meta['blocksize']} is not one of {BLOCKSIZES}")
    if meta["dtype"] not in DTYPES:
        raise ValueError(f"{key}: dtype {meta['dtype']!r} is not one of {sorted(DTYPES)}")
    shape = meta["shape"]
    if not shape or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ValueError(f"{key}: shape {shape} must be a non-empty list of positive sizes")
    return meta


def _expect(t: Tensor, numel: int, dtype: torch.dtype, key: str, why: str) -> None:
    if t.dtype != dtype or t.numel() != numel:
        raise ValueError(f"{key} has {t.numel()} {t.dtype} values, expected {numel} {dtype} ({why})")
