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
    return {**settings, "bf16": bf16, "processes": processes, "data": data_fingerprint(data)}


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
    changed = [f"{NOT_FLAGS.get(k, '--' + k)}: {saved[k]} in the checkpoint, {current[k]} now"
               for k in saved if k in current and saved[k] != current[k]]
    if changed:
        raise ValueError(f"--resume {path}: settings differ from the run that wrote the checkpoint: "
                         f"{'; '.join(changed)}. Resume with the same settings (e.g. --config "
                         f"{path.parent / 'run_config.yaml'}) or start a new run")


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
