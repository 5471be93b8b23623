"""AdamW with 8-bit state, in plain PyTorch: the CPU form of `--optim adamw_8bit`.

The moments m and v of each parameter are kept as one byte per value: blocks of 256 values,
each scaled by its absolute maximum, then rounded to the nearest entry of the dynamic map of
Dettmers et al. (8-bit Optimizers via Block-wise Quantization, 2022; the map bitsandbytes builds
with `create_dynamic_map`): m on the signed map, v on the unsigned one. Each step dequantises
m and v, applies torch.optim.AdamW's update in float32, and requantises. As in bitsandbytes,
parameters smaller than `min_8bit_size` values keep float32 state (8 bits would save nothing
worth the error). The state is tensors and ints only, so optimizer.pt loads with weights_only=True.
"""
from __future__ import annotations

import functools
import math

import torch

BLOCK = 256


@functools.cache
def dynamic_map(signed: bool) -> torch.Tensor:
    """The 256 sorted values of the 8-bit dynamic map: a decimal exponent 10^-6..10^0 and a linear fraction."""
    values = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2 ** i + 1 if signed else 2 ** (i + 1) + 1, dtype=torch.float32)
        means = ((edges[:-1] + edges[1:]) / 2 * 10.0 ** (i - 6)).tolist()
        values += means + ([-x for x in means] if signed else [])
    values += [0.0] * (256 - len(values))  # the signed map has 255 distinct values
    return torch.tensor(sorted(values), dtype=torch.float32)


def _order_key(x: torch.Tensor) -> torch.Tensor:
    """The top 16 bits of each float32, as an index 0..65535 that rises with the value."""
    bits = x.view(torch.int32)
    return ((bits ^ ((bits >> 31) & 0x7FFFFFFF)) >> 16) + 32768


@functools.cache
def _nearest_table(signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(for each 16-bit key: the count of midpoints between map entries below it; the midpoints, then inf).

    No two midpoints share a key, so a value's nearest entry is its key's count, plus one if it
    lies above the next midpoint: torch.bucketize's answer, several times faster."""
    code = dynamic_map(signed)
    midpoints = (code[1:] + code[:-1]) / 2
    counts = torch.searchsorted(_order_key(midpoints), torch.arange(65536, dtype=torch.int32), out_int32=True)
    return counts, torch.cat([midpoints, torch.tensor([math.inf])])


def quantize(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes: uint8 per value, absmax: float32 per block of 256) of a flat float32 tensor."""
    blocks = torch.nn.functional.pad(x, (0, -x.numel() % BLOCK)).view(-1, BLOCK)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    counts, midpoints = (t.to(x.device) for t in _nearest_table(signed))
    below = counts.index_select(0, _order_key(scaled).view(-1))  # index_select: ~8x faster than [] here
    return (below + (scaled.view(-1) > midpoints.index_select(0, below))).to(torch.uint8), absmax


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, signed: bool, numel: int) -> torch.Tensor:
    """The flat float32 tensor of `numel` values that `quantize` encoded."""
    values = dynamic_map(signed).to(codes.device).index_select(0, codes.int()).view(-1, BLOCK) * absmax[:, None]
    return values.view(-1)[:numel]


class AdamW8bit(torch.optim.Optimizer):
    """torch.optim.AdamW's update with m and v stored blockwise in 8 bits (float32 for small parameters)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, min_8bit_size: int = 4096):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.min_8bit_size = min_8bit_size

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step over every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        """AdamW on one parameter: read m and v, update them and p, store them again."""
        state, (beta1, beta2) = self.state[p], group["betas"]
        grad = p.grad.detach().reshape(-1).float()
        m, v = self._moments(p, state)
        state["step"] = step = state.get("step", 0) + 1
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (v.sqrt() / math.sqrt(1 - beta2 ** step)).add_(group["eps"])
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.view(-1).addcdiv_(m, denom, value=-group["lr"] / (1 - beta1 ** step))
        if p.numel() >= self.min_8bit_size:
            state["exp_avg_codes"], state["exp_avg_absmax"] = quantize(m, signed=True)
            state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"] = quantize(v, signed=False)

    def _moments(self, p: torch.Tensor, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """m and v of `p` as flat float32 tensors (views of the state when it is kept in float32)."""
        if "exp_avg_codes" in state:
            return (dequantize(state["exp_avg_codes"], state["exp_avg_absmax"], True, p.numel()),
                    dequantize(state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"], False, p.numel()))
        if p.numel() < self.min_8bit_size:
            state.setdefault("exp_avg", torch.zeros(p.numel(), device=p.device))
            state.setdefault("exp_avg_sq", torch.zeros(p.numel(), device=p.device))
            return state["exp_avg"], state["exp_avg_sq"]
        return torch.zeros(p.numel(), device=p.device), torch.zeros(p.numel(), device=p.device)
