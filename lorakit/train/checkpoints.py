"""Training checkpoints: everything needed to continue a run exactly, written atomically.

    checkpoint-<step>/
      trainable.safetensors   every trainable parameter, by name
      adapter_config.json,    (LoRA / DoRA) the adapter in PEFT format, loadable as is
      adapter_model.safetensors
      optimizer.pt, scheduler.pt, rng_state.pt   (read back with weights_only=True)
      trainer_state.json      step, epoch, run id, the settings that decide the run's steps

Under --fsdp, trainable.safetensors and optimizer.pt are replaced by torch.distributed.checkpoint
(DCP) shards: every rank writes its own `__<rank>_0.distcp` and rank 0 the `.metadata`; DCP reshards
on load, so a run saved on N processes resumes on any number (the same global batch). The adapter
files are gathered whole on rank 0, as in any checkpoint.

The folder is written under a temporary name and renamed once complete, so a run killed at
any moment leaves either the whole checkpoint or none. output_dir/run.json names the run that
last started there, so `--resume` never continues another run's checkpoint.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from lorakit.io import files
from lorakit.model.peft_model import PeftModel
from lorakit.train import distributed, fsdp

PREFIX = "checkpoint-"
RUN_FILE = "run.json"


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def folder_run_id(output_dir: Path) -> str | None:
    """The id of the run that last started in output_dir (None: none recorded)."""
    file = output_dir / RUN_FILE
    return json.loads(file.read_text()).get("run_id") if file.is_file() else None


def write_run_id(output_dir: Path, run_id: str | None) -> None:
    (output_dir / RUN_FILE).write_text(json.dumps({"run_id": run_id}) + "\n")


def read_state(path: Path) -> dict:
    """A checkpoint's trainer_state.json."""
    return json.loads((path / "trainer_state.json").read_text())


def capture_rng(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(output_dir: Path, step: int, model: nn.Module, optimizer, scheduler,
                    rng_states: list[dict], trainer_state: dict) -> Path:
    """Write checkpoint-<step> atomically and return its path (rank 0 only)."""
    final = output_dir / f"{PREFIX}{step}"
    tmp = output_dir / f".{PREFIX}{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a run killed while writing
    tmp.mkdir(parents=True)
    files.save_safetensors(trainable_state(model), tmp / "trainable.safetensors")
    if isinstance(model, PeftModel):
        model.save_pretrained(str(tmp))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    _write_run_state(tmp, step, scheduler, rng_states, trainer_state)
    _publish(tmp, final)
    return final


def _write_run_state(tmp: Path, step: int, scheduler, rng_states: list[dict], trainer_state: dict) -> None:
    """The files every checkpoint has, whole or sharded: schedule, random states and trainer_state.json."""
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_states, tmp / "rng_state.pt")
    (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "global_step": step}, indent=2))


def _publish(tmp: Path, final: Path) -> None:
    """Rename the complete temporary folder to its final name (replacing a checkpoint of the same step)."""
    if final.exists():  # the same step saved before (e.g. Ctrl-C right after a periodic save)
        stale = final.parent / f".{final.name}.old"
        os.replace(final, stale)
        os.replace(tmp, final)
        shutil.rmtree(stale)
    else:
        os.replace(tmp, final)


def sharded_state(engine: nn.Module, optimizer) -> dict:
    """The trainable weights and the optimiser state, by name, as DCP saves and loads them (DTensor shards
    under FSDP, whole tensors on one process)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    fsdp.reshard(engine)
    model, optim = get_state_dict(engine, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    return {"model": model, "optimizer": optim}


def save_sharded_checkpoint(output_dir: Path, step: int, model: nn.Module, engine: nn.Module, optimizer, scheduler,
                            rng_states: list[dict], trainer_state: dict, ctx: distributed.Dist) -> Path:
    """Write checkpoint-<step> from every rank (--fsdp): DCP shards, then rank 0's files; rank 0 renames the
    temporary folder once every rank has finished."""
    import torch.distributed.checkpoint as dcp

    final = output_dir / f"{PREFIX}{step}"
    tmp = output_dir / f".{PREFIX}{step}.tmp"
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier(ctx)
    dcp.save(sharded_state(engine, optimizer), checkpoint_id=str(tmp))
    with fsdp.gathered(model, ctx.is_main):
        if ctx.is_main and isinstance(model, PeftModel):
            model.save_pretrained(str(tmp))
    if ctx.is_main:
        _write_run_state(tmp, step, scheduler, rng_states, trainer_state)
    distributed.barrier(ctx)
    if ctx.is_main:
        _publish(tmp, final)
    return final


def is_sharded_checkpoint(path: Path) -> bool:
    return (path / ".metadata").is_file()


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in output_dir, oldest step first."""
    found = [p for p in output_dir.glob(f"{PREFIX}*") if re.fullmatch(rf"{PREFIX}\d+", p.name)
             and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def run_checkpoints(output_dir: Path, run_id: str | None) -> list[Path]:
    """The complete checkpoints of run `run_id` in output_dir, oldest first."""
    return [p for p in list_checkpoints(output_dir) if read_state(p).get("run_id") == run_id]


def resolve_resume(resume: str, output_dir: Path) -> Path:
    """The checkpoint folder that `--resume` names (`latest`: the newest of output_dir's run);
    refuses a checkpoint of another run than the one that last started in output_dir."""
    run_id = folder_run_id(output_dir)
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"--resume: no checkpoint-<step> folder in {output_dir} to resume from")
        mine = found if run_id is None else run_checkpoints(output_dir, run_id)
        if not mine:
            raise ValueError(f"--resume: the run that last started in {output_dir} (run {run_id}) saved no "
                             f"checkpoint; {', '.join(p.name for p in found)} belong to an earlier run. Start "
                             "a new run, or continue that one elsewhere: --resume CHECKPOINT --output_dir NEW_DIR")
        return mine[-1]
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"--resume {resume}: not a lorakit checkpoint folder "
                                "(expected checkpoint-<step> with trainer_state.json)")
    owner = read_state(path).get("run_id")
    if run_id is not None and owner != run_id:
        raise ValueError(f"--resume {resume}: {path.name} belongs to run {owner}, but {output_dir} was last used "
                         f"by run {run_id}; continuing it there would mix two runs' checkpoints and logs. "
                         f"Continue it elsewhere: --resume {resume} --output_dir NEW_DIR")
    return path


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler,
                    engine: nn.Module | None = None) -> tuple[dict, list[dict]]:
    """Restore parameters, optimiser and scheduler; return (trainer_state, per-rank RNG states). A sharded
    checkpoint (--fsdp) loads through `engine`, the run's step module, resharded to this run's ranks."""
    if is_sharded_checkpoint(path):
        _load_sharded(path, engine if engine is not None else model, optimizer)
    else:
        _load_whole(path, model, optimizer)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng_states = torch.load(path / "rng_state.pt", weights_only=True)
    return read_state(path), rng_states


def _load_sharded(path: Path, engine: nn.Module, optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = sharded_state(engine, optimizer)
    try:
        dcp.load(state, checkpoint_id=str(path))
    except Exception as err:  # DCP names the tensor that is missing or of another shape
        raise ValueError(f"{path} does not match this model and adapter settings: {err}") from None
    set_state_dict(engine, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))


def _load_whole(path: Path, model: nn.Module, optimizer) -> None:
    if not (path / "trainable.safetensors").is_file():
        raise FileNotFoundError(f"{path}: no trainable.safetensors (nor DCP shards)")
    saved = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(saved) != expected:
        missing, extra = sorted(expected - set(saved)), sorted(set(saved) - expected)
        raise ValueError(f"{path} does not match this model and adapter settings: "
                         f"missing {missing[:5]}, unexpected {extra[:5]}")
    for name, tensor in saved.items():
        if params[name].shape != tensor.shape:
            raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, the model expects "
                             f"{tuple(params[name].shape)} (was --lora_rank changed?)")
        with torch.no_grad():
            params[name].copy_(tensor)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))


def rotate(output_dir: Path, keep: int, own: set[str]) -> None:
    """Delete this run's oldest checkpoints beyond the newest `keep`; never another run's."""
    mine = [p for p in list_checkpoints(output_dir) if p.name in own]
    for old in mine[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
        own.discard(old.name)
