"""The run's peak memory beside `lorakit plan`'s prediction for it, so that every run checks the planner.

On CUDA the measure is the allocator's peak of tensor bytes (torch.cuda.max_memory_allocated), the number the
planner predicts. On a CPU torch keeps no allocator statistics, and the exact live-tensor count
(tests/live_bytes.py, from the profiler's memory events) is far too slow for every run, so what is logged is the
process's peak resident memory (VmHWM): an upper bound that includes the interpreter, the libraries and the
allocator's slack, not tensor bytes.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

CUDA_MEASURE = "torch.cuda.max_memory_allocated"
RSS_MEASURE = "VmHWM (process RSS, an upper bound: includes the interpreter and libraries)"


def reset(device: torch.device) -> None:
    """Start the peak over at the start of training: the CUDA allocator's peak; on Linux the process's peak
    resident set (/proc/self/clear_refs 5), so model loading's spikes are left out where the kernel allows."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def measured(device: torch.device) -> tuple[int | None, str]:
    """(peak bytes since `reset`, what they measure); None where the platform gives no measure."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), CUDA_MEASURE
    return _peak_rss(), RSS_MEASURE


def _peak_rss() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, kB elsewhere


def planned(model_path: str, args, bf16: bool, longest: int) -> tuple[int | None, str | None]:
    """(the planner's peak for this run, None) or (None, why it could not plan it). The plan is for the run's
    precision and its longest training example (batches are padded to their longest row, not --max_length)."""
    try:
        from lorakit.plan import predict_peak

        return predict_peak(model_path, dataclasses.replace(args, bf16=bf16, max_length=max(1, longest))), None
    except ValueError as err:  # a run the planner does not describe: its own words
        return None, str(err)
    except Exception as err:  # a run that trained must not fail over its memory report
        return None, f"{type(err).__name__}: {err}"


def record(model_path: str, args, bf16: bool, longest: int, device: torch.device) -> dict:
    """The metrics.jsonl fields of the run's memory check (without its step)."""
    peak, measure = measured(device)
    predicted, why_not = planned(model_path, args, bf16, longest)
    fields = {"event": "memory", "predicted_peak_bytes": predicted, "measured_peak_bytes": peak,
              "device": device.type, "measure": measure,
              "planned_for": {"batch": args.per_device_train_batch_size, "seq": longest}}
    return fields if why_not is None else {**fields, "plan_error": why_not}


def describe(fields: dict) -> str:
    """One line for the end of the run: 'memory: planned X GiB, measured Y GiB (what is measured)'."""
    planned_text = (f"planned {_size(fields['predicted_peak_bytes'])}" if fields["predicted_peak_bytes"] is not None
                    else f"not planned ({fields['plan_error']})")
    measured_text = _size(fields["measured_peak_bytes"]) if fields["measured_peak_bytes"] is not None else "unknown"
    return f"memory: {planned_text}, measured {measured_text} ({fields['measure']})"


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
