"""QLoRA's frozen base: Linear layers whose weights are stored in NF4 and dequantised on the fly.

`NF4Linear` keeps only the packed 4-bit weight and its quantisation state; each forward and
backward dequantises that one layer's weight, uses it, and lets it go, so no full-precision
copy of the model exists at any time. Gradients flow to the input (and so to LoRA adapters
around the layer), never to the 4-bit weight.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.modules import is_within, replace_module
from lorakit.quant.nf4 import NF4_CODE, NF4Weight, block_absmax, dequantize_nf4, quantize_nf4

_STATE = ("absmax", "nested_absmax", "nested_code")  # tensors of NF4Weight besides the packed data


def dequantize_whole(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                     numel: int, dtype: torch.dtype) -> torch.Tensor:
    """All of a weight at once (no chunks): level * block scale in fp32, then cast. The GPU path."""
    levels = code[torch.stack([packed >> 4, packed & 15], dim=1).view(-1).long()][:numel]
    n = numel - numel % blocksize
    head = (levels[:n].view(-1, blocksize) * absmax[:n // blocksize, None]).view(-1)
    tail = levels[n:] * absmax[n // blocksize:][:1]
    return torch.cat([head, tail]).to(dtype)


_COMPILED = None


def _compiled_dequantize():
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(dequantize_whole, dynamic=True)
    return _COMPILED


class _DequantizedMatmul(torch.autograd.Function):
    """x @ W.T with W dequantised in forward and again in backward, instead of saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: NF4Linear) -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return grad_out @ ctx.layer.dequantize(grad_out.dtype), None


class NF4Linear(nn.Module):
    """A frozen nn.Linear in NF4 (bitsandbytes-compatible storage, double-quantised by default)."""

    def __init__(self, q: NF4Weight, bias: torch.Tensor | None = None):
        super().__init__()
        if len(q.shape) != 2:
            raise ValueError(f"NF4Linear needs a 2-D weight, got shape {tuple(q.shape)}")
        self.out_features, self.in_features = q.shape
        self.blocksize, self.weight_dtype, self.offset = q.blocksize, q.dtype, q.offset
        self.register_buffer("weight_packed", q.data)
        for name in _STATE:
            self.register_buffer(f"weight_{name}", getattr(q, name))
        frozen_bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.register_parameter("bias", frozen_bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True) -> NF4Linear:
        return cls(quantize_nf4(linear.weight.detach(), blocksize, double_quant), linear.bias)

    @property
    def quantized(self) -> NF4Weight:
        return NF4Weight(self.weight_packed, self.weight_absmax, torch.Size((self.out_features, self.in_features)),
                         self.weight_dtype, self.blocksize, self.weight_nested_absmax, self.weight_nested_code,
                         self.offset)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight (out x in) in `dtype` (default: the dtype it was quantised from)."""
        q = self.quantized
        if q.data.is_cuda:  # one compiled kernel per shape instead of chunked eager ops
            return _compiled_dequantize()(q.data, block_absmax(q), NF4_CODE.to(q.data.device), q.blocksize,
                                          q.numel, dtype or q.dtype).view(q.shape)
        return dequantize_nf4(q, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            out = _DequantizedMatmul.apply(x, self)
        else:
            out = F.linear(x, self.dequantize(x.dtype))
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def _apply(self, fn, recurse: bool = True):
        """Devices change; the quantisation state's dtypes do not (.half() must not round the scales)."""
        before = {n: t for n, t in self._buffers.items() if t is not None and t.is_floating_point()}
        super()._apply(fn, recurse)
        for name, old in before.items():
            if self._buffers[name].dtype != old.dtype:
                self._buffers[name] = old.to(self._buffers[name].device)
        return self

    def storage_as_parameters(self) -> None:
        """Hold the 8-bit storage (the packed codes; the block scales too when double quantisation made them
        8-bit codes) as frozen parameters instead of buffers, under the same names, so that FSDP2 shards them
        with the other parameters of their unit. FSDP2 keeps non-float parameters out of mixed precision and
        all-gathers a unit of mixed dtypes as bytes, so the codes arrive whole and unchanged; fp32 scales stay
        buffers (replicated, and never cast to bf16)."""
        for name in ("weight_packed", "weight_absmax"):
            tensor = self._buffers.get(name)
            if tensor is not None and tensor.dtype == torch.uint8:
                del self._buffers[name]
                self.register_parameter(name, nn.Parameter(tensor, requires_grad=False))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nf4 blocksize={self.blocksize}, "
                f"double_quant={self.weight_nested_absmax is not None}")


def quantize_linears(model: nn.Module, skip: set[str] = frozenset(), blocksize: int = 64,
                     double_quant: bool = True) -> list[str]:
    """Replace every nn.Linear not within a module of `skip` by an NF4Linear, one at a time; returns the names
    replaced."""
    names = linears_to_quantize(model, skip)
    for name in names:
        replace_module(model, name, NF4Linear.from_linear(model.get_submodule(name), blocksize, double_quant))
    return names


def linears_to_quantize(model: nn.Module, skip: set[str] = frozenset()) -> list[str]:
    """The nn.Linear layers quantize_linears replaces: all but those within a module of `skip`
    (lorakit.modules.is_within: "pooler" keeps "bert.pooler.dense" dense)."""
    return [name for name, module in model.named_modules()
            if type(module) is nn.Linear and not is_within(name, skip)]
