"""Resuming a run: its folder checked before anything loads, and a checkpoint accepted only from
this run and only with the settings that give the same steps."""
from __future__ import annotations

import hashlib
import tempfile
from array import array
from pathlib import Path

from lorakit.train import checkpoints
from lorakit.train.args import TrainArgs
from lorakit.train.prepare import PreparedData

# The only settings that may differ on --resume: they change no step of the run. Every other
# TrainArgs field, the data's token ids, bf16 and the process count must match the checkpoint.
FREE_ON_RESUME = ("output_dir", "overwrite", "resume", "logging_steps", "eval_steps", "save_steps",
                  "save_total_limit", "report_to", "per_device_eval_batch_size", "gradient_checkpointing",
                  "memory_savers")


# How the global batch is split may change on --resume (a checkpoint is whole, or DCP shards that reshard
# on load), as long as the global batch itself stays: per device x processes x accumulation.
BATCH_SPLIT = ("per_device_train_batch_size", "gradient_accumulation_steps", "processes")
_BATCH = (*BATCH_SPLIT, "global_batch_size")

NOT_FLAGS = {"data": "the data (token ids of the train and eval examples)",
             "processes": "processes (torchrun --nproc_per_node)"}


def data_fingerprint(data: PreparedData) -> str:
    """A short hash of the train and eval token ids and labels."""
    digest = hashlib.sha256()
    for split in (data.train, data.val):
        digest.update(array("q", [len(split)]).tobytes())
        for item in split:
            labels = item.labels if isinstance(item.labels, list) else [item.labels]
            for values in (item.input_ids, labels):
                digest.update(array("q", [len(values), *values]).tobytes())
    return digest.hexdigest()[:16]


def run_trajectory(args: TrainArgs, data: PreparedData, processes: int, bf16: bool) -> dict:
    """What decides the steps of a run (saved in its checkpoints, compared on --resume)."""
    settings = {k: v for k, v in args.to_dict().items() if k not in FREE_ON_RESUME}
    return {**settings, "bf16": bf16, "processes": processes,
            "global_batch_size": global_batch_size(settings, processes), "data": data_fingerprint(data)}


def global_batch_size(settings: dict, processes: int) -> int:
    return settings["per_device_train_batch_size"] * processes * settings["gradient_accumulation_steps"]


def resume_point(args: TrainArgs, out: Path, trajectory: dict) -> tuple[Path | None, str]:
    """(checkpoint to resume from or None, this run's id); refuses another run's or other settings'."""
    if not args.resume:
        return None, checkpoints.new_run_id()
    path = checkpoints.resolve_resume(args.resume, out)
    state = checkpoints.read_state(path)
    check_same_trajectory(state.get("trajectory", {}), trajectory, path)
    return path, state.get("run_id")


def check_same_trajectory(saved: dict, current: dict, path: Path) -> None:
    """Refuse to resume a checkpoint with settings that change the run's steps, naming each."""
    if all(k in saved for k in BATCH_SPLIT) and "global_batch_size" not in saved:  # written before the split was free
        saved = {**saved, "global_batch_size": global_batch_size(saved, saved["processes"])}
    changed = [f"{NOT_FLAGS.get(k, '--' + k)}: {saved[k]} in the checkpoint, {current[k]} now"
               for k in saved if k in current and saved[k] != current[k] and k not in _BATCH]
    if saved.get("global_batch_size", current["global_batch_size"]) != current["global_batch_size"]:
        changed.append(_batch_change(saved, current))
    if changed:
        raise ValueError(f"--resume {path}: settings differ from the run that wrote the checkpoint: "
                         f"{'; '.join(changed)}. Resume with the same settings (e.g. --config "
                         f"{path.parent / 'run_config.yaml'}) or start a new run")


def _batch_change(saved: dict, current: dict) -> str:
    """Why the global batch differs, and which splits over this process count would keep it."""
    size, processes = saved["global_batch_size"], current["processes"]
    fix = (f"with {processes} processes, give --per_device_train_batch_size x --gradient_accumulation_steps = "
           f"{size // processes}" if size % processes == 0 else
           f"{size} examples cannot be split over {processes} processes; use a process count that divides {size}")
    return (f"global batch: {size} in the checkpoint ({_split(saved)}), {current['global_batch_size']} now "
            f"({_split(current)}); {fix}")


def _split(trajectory: dict) -> str:
    return (f"{trajectory['per_device_train_batch_size']} per device x {trajectory['processes']} processes x "
            f"{trajectory['gradient_accumulation_steps']} accumulation")


def prepare_output_dir(args: TrainArgs) -> Path:
    """The run's folder, created and checked writable before anything loads; refuses one that holds a
    previous run unless resuming or --overwrite."""
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output_dir {out} is a file; give a folder (it is created if missing)")
    if args.resume == "latest" and not out.is_dir():
        raise FileNotFoundError(f"--resume: output_dir {out} does not exist")
    if not args.resume and out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"output_dir {out} already holds files from a previous run; pass "
                              "--resume to continue it, --overwrite to write into it anyway (nothing "
                              "there is deleted), or choose another --output_dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as err:
        raise ValueError(f"--output_dir {out} cannot be written: {err.strerror or err}") from None
    return out
