"""Which precision a device computes fastest in: the CPU's matrix units, read once from torch.

A CPU with AMX-BF16 (Intel Sapphire Rapids and later) or AVX-512-BF16 (Intel Cooper Lake,
AMD Zen 4 and later) multiplies bf16 matrices about 4x faster than fp32; on such a CPU, as on
CUDA, lorakit computes in bf16 by default (autocast, fp32 adapters and optimiser states).
"""
from __future__ import annotations

import functools

import torch

# The CPU's bf16 matrix units, fastest first, by the names torch.cpu.get_capabilities() uses.
BF16_UNITS = ("amx_bf16", "avx512_bf16")


@functools.cache
def cpu_matrix_unit() -> str:
    """'amx_bf16', 'avx512_bf16' or 'none': the fastest bf16 matrix unit this CPU has."""
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return next((unit for unit in BF16_UNITS if capabilities.get(unit)), "none")


def fast_bf16(device: torch.device | str) -> bool:
    """Whether bf16 is the better default on this device: CUDA with bf16 support, or a CPU with a bf16 unit."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_matrix_unit() != "none"


def describe(device: torch.device | str) -> str:
    """One line for run logs and --help: the device and the precision lorakit picks on it by default."""
    device = torch.device(device)
    if device.type == "cpu":
        unit = cpu_matrix_unit()
        return f"cpu ({unit} matrix unit): default {'bf16 autocast' if unit != 'none' else 'fp32'}"
    return f"{device.type}: default {'bf16 autocast' if fast_bf16(device) else 'fp32'}"


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def inference_dtype(torch_dtype: str, device: torch.device | str) -> torch.dtype:
    """The dtype to load a model in for inference: --torch_dtype by name, or for 'auto' bf16 where
    fast_bf16(device), else fp32."""
    if torch_dtype == "auto":
        return torch.bfloat16 if fast_bf16(device) else torch.float32
    if torch_dtype not in DTYPES:
        raise ValueError(f"--torch_dtype {torch_dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[torch_dtype]
