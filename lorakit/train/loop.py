"""The training recipe, top to bottom: setup, data, model, loop, save.

The loss is a sum over label tokens (or examples, for classification) divided by the count
in the whole global batch, so one process and N processes with the same global batch take
the same steps. Under torchrun the step runs in DDP (or FSDP2 with --fsdp), whose gradient reduction
averages over ranks: each rank's share of the loss is scaled by the process count so the average is the sum.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import random
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lorakit import precision
from lorakit.data.encode import Encoded, collate, loss_units
from lorakit.io import files
from lorakit.io.empty_model import empty_model
from lorakit.io.pretrained import load_config, load_model, load_tokenizer, resolve_model_path
from lorakit.memory.loss import IGNORE_INDEX
from lorakit.train import checkpoints, distributed, fsdp, lr_range, peak
from lorakit.train.args import TrainArgs
from lorakit.train.loss import batch_loss_sum
from lorakit.train.metrics import METRICS_FILE, MetricsLog, append_event, plot_loss_curve
from lorakit.train.model import part_counts, prepare_model, save_trained
from lorakit.train.optim import build_optimizer
from lorakit.train.prepare import (
    BASE_RANK,
    PreparedData,
    describe_data,
    fit_max_length,
    global_batch_size,
    prepare_data,
    resolve_args,
    steps_per_epoch,
    total_steps,
)
from lorakit.train.resume import prepare_output_dir, resume_point, run_trajectory


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; nothing from that step was applied."""


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(n, generator=generator).tolist()


def global_batch(n: int, step: int, steps_per_epoch: int, global_size: int, seed: int) -> list[int]:
    """The example indices of optimiser step `step` (a function of the step alone, for resuming)."""
    epoch, k = divmod(step, steps_per_epoch)
    return epoch_order(n, seed, epoch)[k * global_size:(k + 1) * global_size]


def accumulate_gradients(engine, examples: list[Encoded], args: TrainArgs, pad_id: int, ctx: distributed.Dist,
                         bf16: bool) -> float:
    """Forward and backward this rank's micro-batches of one global batch; returns its share of the loss.

    Micro-batch m of rank r holds examples [(m * world + r) * b, ... + b) of the global batch. `engine` is the
    run's step module (distributed.wrap): DDP reduces gradients on the last micro-batch only.
    """
    units = sum(loss_units(item) for item in examples)
    size, total, steps = args.per_device_train_batch_size, 0.0, args.gradient_accumulation_steps
    for micro in range(steps):
        offset = (micro * ctx.world + ctx.rank) * size
        chunk, weight = examples[offset:offset + size], 1.0
        if not chunk:  # the last, partial global batch may leave a rank without examples
            if ctx.world == 1:
                continue
            chunk, weight = examples[:1], 0.0  # it still joins the ranks' collectives, adding nothing
        batch = {k: v.to(ctx.device) for k, v in collate(chunk, pad_id).items()}
        with distributed.sync_gradients(engine, last=micro == steps - 1):
            with autocast(ctx, bf16):
                loss = engine(batch)[0] / units * weight
            (loss * ctx.world).backward()  # DDP / FSDP average over ranks: times world keeps the sum
        total += loss.item()
    return total


def step_loss(model, batch: dict[str, torch.Tensor], fused: bool):
    """(summed loss, logits or None) of a batch: the forward of the run's step module."""
    return batch_loss_sum(model, batch, fused)


def autocast(ctx: distributed.Dist, bf16: bool):
    return torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=bf16)


@torch.no_grad()
def evaluate(model, items: list[Encoded], args: TrainArgs, pad_id: int, ctx: distributed.Dist,
             bf16: bool, num_labels: int = 0) -> dict[str, float]:
    """Loss (and, for classification, accuracy and the share of rows given the most-predicted class) over the
    eval set, sharded across ranks. `model`: the run's step module (distributed.StepModule: forward(batch) ->
    (summed loss, logits or None)); `num_labels`: the classifier's label count (0 for SFT)."""
    was_training = model.training
    model.eval()
    total, units, correct = 0.0, 0, 0
    predicted = torch.zeros(num_labels, dtype=torch.long)
    mine = items[ctx.rank::ctx.world]
    for start in range(0, len(mine), args.per_device_eval_batch_size):
        batch = {k: v.to(ctx.device) for k, v in
                 collate(mine[start:start + args.per_device_eval_batch_size], pad_id).items()}
        with autocast(ctx, bf16):
            loss, logits = model(batch)
        total += loss.item()
        if logits is not None and logits.dim() == 2:
            guesses = logits.argmax(-1)
            units += len(batch["labels"])
            correct += (guesses == batch["labels"]).sum().item()
            predicted += guesses.cpu().bincount(minlength=num_labels)[:num_labels]
        else:
            units += (batch["labels"][:, 1:] != IGNORE_INDEX).sum().item()
    total, units, correct, *counts = distributed.sum_across([total, units, correct, *predicted.tolist()], ctx)
    model.train(was_training)
    result = {"eval_loss": total / max(units, 1)}
    if items and isinstance(items[0].labels, int):
        result["eval_accuracy"] = correct / max(units, 1)
        if counts:
            result["eval_top_class_share"] = max(counts) / max(units, 1)
    return result


def one_class_warning(metrics: dict, items: list[Encoded], rate: float, step: int) -> str | None:
    """A warning when a classifier gives every eval row one class at `step` although the rows hold several:
    not yet trained, or the collapse a too-high learning rate causes (docs/training.md#defaults)."""
    if metrics.get("eval_top_class_share", 0.0) < 1.0 or len({item.labels for item in items}) < 2:
        return None
    return (f"warning: every eval row was predicted as one class after {step} steps (accuracy "
            f"{metrics['eval_accuracy']:.4f} is that class's share of the rows): the model has not learned the task "
            f"yet or it collapsed, most often because the learning rate ({rate:.2e}) is too high for this run. If "
            f"more steps do not help, run again with a lower one, e.g. --learning_rate {rate / 2:.1e} "
            "(docs/training.md#defaults).")


def train(args: TrainArgs) -> dict:
    """Run one training job; returns the final metrics (also written to final_metrics.json)."""
    ctx = distributed.setup(sharded=bool(args.fsdp))
    try:
        return _train(args, ctx)
    finally:
        distributed.teardown(ctx)


@dataclass
class Run:
    """What one training job holds while it runs: set up by `setup`, advanced by `train_step`."""
    args: TrainArgs
    ctx: distributed.Dist
    out: Path
    data: PreparedData
    tokenizer: object
    model: torch.nn.Module
    bf16: bool
    run_id: str
    trajectory: dict
    steps_per_epoch: int
    total_steps: int
    optimizer: torch.optim.Optimizer | None = None  # built once the learning rate is known
    scheduler: object = None
    step: int = 0
    history: dict = field(default_factory=dict)
    own_checkpoints: set = field(default_factory=set)
    last_checkpoint: Path | None = None
    model_path: str = ""  # the local folder the model was loaded from (for the memory plan)
    engine: torch.nn.Module | None = None  # runs the step: the model and its loss, in DDP or FSDP (distributed.wrap)

    @functools.cached_property
    def params(self) -> list[torch.nn.Parameter]:  # fixed once set up: not rebuilt every step
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def global_size(self) -> int:
        return global_batch_size(self.args, self.ctx.world)

    def say(self, *text, **kw) -> None:
        if self.ctx.is_main:
            print(*text, **kw)


def _train(args: TrainArgs, ctx: distributed.Dist) -> dict:
    started = time.time()
    run = setup(args, ctx)
    log = start_logs(run)
    if "before" not in run.history and run.data.val:
        run.history["before"] = evaluate_run(run)
        run.say("before training: " + _fmt(run.history["before"]))
    timer = time.time()  # the training loop alone (train_runtime_s)
    peak.reset(run.ctx.device)
    train_steps(run, log, timer)
    memory = log_memory(run)
    result = {"global_step": run.step, "train_runtime_s": round(time.time() - timer, 2),
              "total_runtime_s": round(time.time() - started, 2), **parameter_counts(run.model),
              **_flat(run.history)}
    finish(run, result)
    run.say(peak.describe(memory))
    return result


def setup(args: TrainArgs, ctx: distributed.Dist) -> Run:
    """Output folder, tokenizer, data, model, optimizer and schedule; restored from a checkpoint
    when resuming. Everything that can be refused is checked before the model loads."""
    if args.output_dir is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        args = dataclasses.replace(args, output_dir=f"outputs/{Path(args.model).name}-{stamp}")
    say = print if ctx.is_main else (lambda *a, **k: None)
    out = prepare_output_dir(args)
    model_path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(model_path)
    args = fit_max_length(args, model_path, say)
    data = prepare_data(args, tokenizer)
    given_rate = args.learning_rate
    per_epoch, steps = steps_per_epoch(args, len(data.train), ctx.world), total_steps(args, len(data.train), ctx.world)
    args = resolve_args(args, data, steps, load_config(model_path).model_type)
    say(describe_data(data, args))
    if given_rate is None:
        rank = f" at rank {args.lora_rank}" if args.train_type != "full" and args.lora_rank > BASE_RANK else ""
        say(f"learning rate: {args.learning_rate:.2e}, lorakit's default for {args.train_type} {data.task}{rank} "
            f"over {steps} steps (docs/training.md#defaults)")
    bf16 = args.bf16 if args.bf16 is not None else precision.fast_bf16(ctx.device)
    say(f"precision: {'bf16 autocast, fp32 adapters' if bf16 else 'fp32'} on {precision.describe(ctx.device)}")
    if args.learning_rate == "auto" and args.resume:  # the rate the run picked, not a new test
        args = dataclasses.replace(args, learning_rate=lr_range.saved_rate(args.resume, out))
    trajectory = run_trajectory(args, data, ctx.world, bf16)
    resume_from, run_id = resume_point(args, out, trajectory)
    built = build_model(args, ctx, model_path, data, bf16)
    if built.note:
        say(built.note)
    model = built.model
    engine = distributed.wrap(built, functools.partial(step_loss, fused=args.memory_savers), ctx, bool(args.fsdp),
                              bf16)
    say(distributed.describe(model, ctx, bool(args.fsdp)))
    say(f"model: {model_path} ({args.train_type}), " + describe_parameters(model))
    run = Run(args, ctx, out, data, tokenizer, model, bf16, run_id, trajectory, per_epoch, steps,
              model_path=model_path, engine=engine)
    if args.learning_rate == "auto":
        choose_learning_rate(run)
    run.optimizer = build_optimizer(model, run.args)
    run.scheduler = build_scheduler(run.optimizer, run.args, steps)
    if resume_from:
        restore(run, resume_from)
    return run


def build_model(args: TrainArgs, ctx: distributed.Dist, model_path: str, data: PreparedData,
                bf16: bool) -> distributed.Built:
    """The base model with adapters attached (or unfrozen), in train mode: on the device, or under --fsdp
    built empty, to be filled as distributed.wrap shards it."""
    if args.torch_dtype != "auto":
        base_dtype = getattr(torch, args.torch_dtype)
    else:
        base_dtype = torch.bfloat16 if bf16 and args.train_type != "full" else torch.float32
    random.seed(args.seed)
    torch.manual_seed(args.seed)  # same adapter initialisation on every rank
    source = (model_path, data.task, data.labels, base_dtype, args.quantize, tuple(args.modules_to_save))
    built = distributed.build(lambda: load_model(*source), lambda: empty_model(*source),
                              lambda base: prepare_model(base, args, data.task).train(), ctx, bool(args.fsdp))
    torch.manual_seed(args.seed + ctx.rank)  # independent dropout masks per rank
    return built


def build_scheduler(optimizer: torch.optim.Optimizer, args: TrainArgs, steps: int):
    from transformers import get_scheduler

    return get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=math.ceil(args.warmup_ratio * steps),
                         num_training_steps=steps)


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    params = list(model.parameters())
    return {"trainable_params": sum(p.numel() for p in params if p.requires_grad),
            "total_params": sum(p.numel() for p in params)}


def describe_parameters(model: torch.nn.Module) -> str:
    counts = parameter_counts(model)
    trainable, total = counts["trainable_params"], counts["total_params"]
    parts = ", ".join(f"{part} {count:,}" for part, count in part_counts(model).items())
    return (f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)"
            + (f"; trainable by part: {parts}" if parts else ""))


def restore(run: Run, path: Path) -> None:
    """Continue from a checkpoint of this run: weights, optimizer, schedule, history and random state."""
    state, rng_states = checkpoints.load_checkpoint(path, run.model, run.optimizer, run.scheduler, run.engine)
    run.step, run.history = state["global_step"], state.get("history", {})
    run.own_checkpoints = {p.name for p in checkpoints.run_checkpoints(run.out, run.run_id)}
    run.last_checkpoint = path
    checkpoints.restore_rng(rng_states[run.ctx.rank if run.ctx.rank < len(rng_states) else 0], run.ctx.device)
    run.say(f"resumed from {path} at step {run.step} of {run.total_steps}")


def start_logs(run: Run) -> MetricsLog | None:
    """The run's id and config in its folder, and its metrics log (main process only)."""
    if not run.ctx.is_main:
        return None
    checkpoints.write_run_id(run.out, run.run_id)
    _write_yaml(run.out / "run_config.yaml", run.args.to_dict())
    resumed_at = run.step if run.last_checkpoint else None
    return MetricsLog(run.out, "tensorboard" in run.args.report_to, resumed_at)


def evaluate_run(run: Run) -> dict[str, float]:
    return evaluate(distributed.unwrap(run.engine), run.data.val, run.args, run.tokenizer.pad_token_id, run.ctx,
                    run.bf16, len(run.data.labels))


def save(run: Run, rng: dict) -> Path | None:
    """Checkpoint the run at its current step (written by the main process, rotated)."""
    rng_states = distributed.gather_objects(rng, run.ctx)
    state = {"run_id": run.run_id, "trajectory": run.trajectory, "history": run.history,
             "epoch": run.step / run.steps_per_epoch}
    if run.args.fsdp:  # every rank writes its shards
        path = checkpoints.save_sharded_checkpoint(run.out, run.step, run.model, run.engine, run.optimizer,
                                                   run.scheduler, rng_states, state, run.ctx)
    elif run.ctx.is_main:
        path = checkpoints.save_checkpoint(run.out, run.step, run.model, run.optimizer, run.scheduler, rng_states,
                                           state)
    if not run.ctx.is_main:
        return None
    run.own_checkpoints.add(path.name)
    checkpoints.rotate(run.out, run.args.save_total_limit, run.own_checkpoints)
    return path


def apply_step(run: Run, step: int, optimizer: torch.optim.Optimizer) -> tuple[float, float, list[int]]:
    """Forward, backward and `optimizer` over the step-th global batch: (loss, grad norm, example indices).
    A non-finite loss is returned with nothing applied."""
    args = run.args
    indices = global_batch(len(run.data.train), step, run.steps_per_epoch, run.global_size, args.seed)
    loss = accumulate_gradients(run.engine, [run.data.train[i] for i in indices], args,
                                run.tokenizer.pad_token_id, run.ctx, run.bf16)
    loss = distributed.sum_across([loss], run.ctx)[0]
    grad_norm = float("nan")
    if math.isfinite(loss):
        if args.max_grad_norm > 0:
            grad_norm = distributed.clip_grad_norm(run.params, args.max_grad_norm)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm, indices


def train_step(run: Run) -> tuple[float, float, float, list[int]]:
    """One optimiser step over the next global batch: (loss, grad norm, learning rate, example indices).
    A non-finite loss stops the run before anything is applied."""
    lr = run.scheduler.get_last_lr()[0]
    loss, grad_norm, indices = apply_step(run, run.step, run.optimizer)
    if not math.isfinite(loss):
        raise TrainingDiverged(
            f"loss became {loss} at step {run.step + 1}; that step was not applied. Last good "
            f"checkpoint: {run.last_checkpoint or 'none saved yet'}. Lower --learning_rate and "
            "resume from it with --resume.")
    run.scheduler.step()
    run.step += 1
    return loss, grad_norm, lr, indices


def choose_learning_rate(run: Run) -> None:
    """--learning_rate auto: a range test on the run's first batches sets run.args.learning_rate."""
    test = lr_range.run_range_test(run, lambda r, step, optimizer: apply_step(r, step, optimizer)[0],
                                   lr_range.test_steps(run.total_steps))
    run.args = dataclasses.replace(run.args, learning_rate=test.picked)
    run.trajectory = run_trajectory(run.args, run.data, run.ctx.world, run.bf16)
    if run.ctx.is_main:
        lr_range.save(test, run.out)
        run.say(f"learning rate range test ({len(test.rates)} steps, {run.out / 'lr_range_test.png'}):\n"
                f"{lr_range.ascii_plot(test)}\nlearning rate: {test.picked:.2e} (the loss's minimum at "
                f"{test.picked * lr_range.DIVISOR:.2e}, / {lr_range.DIVISOR:g})")


def train_steps(run: Run, log: MetricsLog | None, timer: float) -> None:
    """Steps to the end, with logs, evaluation and checkpoints on their schedules; Ctrl-C saves
    the step in progress (one process) so that --resume continues it."""
    args = run.args
    eval_every, save_every = args.eval_steps or run.steps_per_epoch, args.save_steps or run.steps_per_epoch
    bar = tqdm(total=run.total_steps, initial=run.step, desc="train", unit="step", disable=not run.ctx.is_main,
               dynamic_ncols=True)
    rng_at_step, tokens_seen = checkpoints.capture_rng(run.ctx.device), 0
    try:
        while run.step < run.total_steps:
            rng_at_step = checkpoints.capture_rng(run.ctx.device)
            loss, grad_norm, lr, indices = train_step(run)
            tokens_seen += sum(len(run.data.train[i].input_ids) for i in indices)
            speed = tokens_seen / max(time.time() - timer, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{speed:,.0f}")
            last = run.step == run.total_steps
            if log and (run.step % args.logging_steps == 0 or last):
                log.log(run.step, train_loss=loss, train_lr=lr, train_grad_norm=grad_norm,
                        train_tokens_per_s=speed, train_epoch=run.step / run.steps_per_epoch)
            if run.data.val and (run.step % eval_every == 0 or last):
                run.history["eval"] = evaluate_run(run)
                if log:
                    log.log(run.step, **run.history["eval"])
                    bar.write(f"step {run.step}: " + _fmt(run.history["eval"]))
                    warning = one_class_warning(run.history["eval"], run.data.val, args.learning_rate, run.step)
                    if warning:
                        bar.write(warning)
            if run.step % save_every == 0 and not last:
                run.last_checkpoint = save(run, checkpoints.capture_rng(run.ctx.device)) or run.last_checkpoint
    except KeyboardInterrupt:
        bar.close()
        if run.ctx.world == 1:
            print(f"\ninterrupted: saved {save(run, rng_at_step)} (step {run.step}); continue with --resume")
        raise
    finally:
        bar.close()
        if log:
            log.close()


def log_memory(run: Run) -> dict:
    """The training loop's peak memory beside the plan's prediction for this run, as one metrics.jsonl record
    (lorakit.train.peak); returned for the run's last line."""
    longest = max((len(item.input_ids) for item in run.data.train), default=1)
    fields = peak.record(run.model_path, run.args, run.bf16, longest, run.ctx.device)
    if run.ctx.is_main:
        append_event(run.out, run.step, fields)
    return fields


def finish(run: Run, result: dict) -> None:
    """The trained adapter (or model), labels, final metrics and loss curve in the run's folder."""
    with fsdp.gathered(run.model, run.ctx.is_main) as whole:  # FSDP: every rank gathers, rank 0 saves
        if run.ctx.is_main:
            save_trained(run.model, run.data.processor or run.tokenizer, run.out, whole)
    if run.ctx.is_main:
        out = run.out
        if run.data.labels:
            files.write_text(out / "labels.json", json.dumps(run.data.labels, indent=2))
        files.write_text(out / "final_metrics.json", json.dumps(result, indent=2))
        plot_loss_curve(out / METRICS_FILE, out / "loss_curve.png")
        print(summary(result, out, run.args))
    distributed.barrier(run.ctx)


def summary(result: dict, out: Path, args: TrainArgs) -> str:
    lines = [f"done: {result['global_step']} steps in {result['train_runtime_s']:.1f}s "
             f"({result['total_runtime_s']:.1f}s with loading and evaluation)"]
    for key in ("loss", "accuracy"):
        before, after = result.get(f"before_eval_{key}"), result.get(f"eval_{key}")
        if before is not None and after is not None:
            lines.append(f"  eval {key}: {before:.4f} before -> {after:.4f} after training")
    kind = "model" if args.train_type == "full" else "adapter (PEFT format)"
    lines.append(f"  {kind} saved in {out}/; metrics in {out}/{METRICS_FILE}, curve in {out}/loss_curve.png")
    if args.train_type != "full":
        lines.append(f"  try it: lorakit infer --adapter {out} ...")
    return "\n".join(lines)


def _flat(history: dict) -> dict:
    """{"before": {eval_loss...}, "eval": {eval_loss...}} -> before_eval_loss, eval_loss, ..."""
    before = {f"before_{key}": value for key, value in history.get("before", {}).items()}
    return {**before, **history.get("eval", {})}


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in metrics.items())


def _write_yaml(path: Path, values: dict) -> None:
    import yaml

    files.write_text(path, yaml.safe_dump(values, sort_keys=False))
