"""What every trainer shares: the accelerator, config.json, the metrics log, atomic rotated
checkpoints, resume, the data order, curves, and the training loop itself (`train_loop`),
into which each trainer plugs its step and its validation.

A run folder:

    config.json                 every resolved argument, written once
    dataset_manifest.json       label map and split (utils.data_loader)
    logs/metrics.jsonl          one JSON object per logged step
    logs/curves.png             the metrics plotted against the step
    samples/step-000250.png     validation grids
    checkpoints/checkpoint-000500/   full training state (rotated)
    final_model/                the inference snapshot
"""

import importlib.util
import json
import math
import os
import platform
import re
import shutil
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from utils.cli import RunFailed, UsageError, resolve_device
from utils.files import atomic_path, write_json

CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)$")
TRAINING_STATE = "training_state.json"


def cpu_computes_bf16():
    """Whether this CPU has bfloat16 units (AVX512-BF16 or AMX), where bf16 autocast is
    faster than fp32; elsewhere it is emulated and slower. (torch.cpu's probes are private,
    hence the fallback.)"""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def cpu_model():
    """The CPU's model name, with "(bf16 units)" where it has them: every reported time names it."""
    name = None
    if Path("/proc/cpuinfo").is_file():
        name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name")), None)
    name = name or platform.processor() or platform.machine()
    return f"{name} (bf16 units)" if cpu_computes_bf16() else name


def computes_bf16(cpu):
    """Whether the device computes bfloat16 natively: a CPU with bf16 units, or a GPU with bf16."""
    return cpu_computes_bf16() if cpu else torch.cuda.is_bf16_supported()


def resolve_precision(choice, cpu):
    """--mixed_precision auto: bf16 where the hardware computes it natively, otherwise fp16
    on a GPU and full precision on a CPU. Other choices pass through."""
    if choice != "auto":
        return choice
    if computes_bf16(cpu):
        return "bf16"
    return "no" if cpu else "fp16"


def add_training_arguments(parser, items):
    """The flags both trainers share, in their "optimisation" and "run folder" groups
    (returned, for each trainer's own flags); `items` names what a batch holds."""
    opt = parser.add_argument_group("optimisation (preset)")
    opt.add_argument("--batch_size", type=int, help=f"{items} per process per step")
    opt.add_argument("--num_epochs", type=int, help="epochs, when --max_train_steps is not given")
    opt.add_argument("--max_train_steps", type=int, help="optimiser steps; overrides --num_epochs")
    opt.add_argument("--learning_rate", type=float)
    opt.add_argument("--warmup_steps", type=int, help="linear warmup, in optimiser steps")
    opt.add_argument("--weight_decay", type=float)
    opt.add_argument("--max_grad_norm", type=float, help="gradient clipping norm")
    opt.add_argument("--gradient_accumulation_steps", type=int)
    opt.add_argument("--mixed_precision", choices=["no", "fp16", "bf16", "auto"],
                     help="auto: bf16 where the CPU or GPU computes it natively, else fp16 on a GPU, no on a CPU")
    opt.add_argument("--use_augmentation", action="store_true", default=None,
                     help=f"random circular time shifts of the {items} (never Doppler flips)")
    run_group = parser.add_argument_group("run folder")
    run_group.add_argument("--checkpointing_steps", type=int, help="save the full training state every N steps")
    run_group.add_argument("--checkpoints_total_limit", type=int, help="keep the newest N checkpoints")
    run_group.add_argument("--resume_from_checkpoint", help="'latest' or a checkpoint folder")
    run_group.add_argument("--validation_steps", type=int, help="validate every N steps")
    run_group.add_argument("--report_to", choices=["none", "tensorboard", "wandb"], help="experiment tracker (default none)")
    return opt, run_group


def check_optimisation(values):
    """Usage errors in the shared optimisation settings of a resolved stage configuration."""
    for name in ("batch_size", "gradient_accumulation_steps"):
        if values[name] < 1:
            raise UsageError(f"--{name} must be at least 1")
    if values["learning_rate"] <= 0:
        raise UsageError(f"--learning_rate must be positive, got {values['learning_rate']}")
    if not (values.get("max_train_steps") or values.get("num_epochs")):  # unset flags may be absent (benchmarks)
        raise UsageError("give --max_train_steps or --num_epochs")


def launcher_precision(given, preset_value):
    """--mixed_precision when given; else what `accelerate launch` passes on from its flag or
    config file (ACCELERATE_MIXED_PRECISION); else the preset's."""
    if given.get("mixed_precision") is not None:
        return given["mixed_precision"]
    return os.environ.get("ACCELERATE_MIXED_PRECISION") or preset_value


def resolve_hardware(device, mixed_precision):
    """(device type, precision) for --device auto|cpu|cuda and --mixed_precision, every
    `auto` decided; fp16 on a CPU is a usage error."""
    device_type = resolve_device(device).type
    precision = resolve_precision(mixed_precision, cpu=device_type == "cpu")
    if device_type == "cpu" and precision == "fp16":
        raise UsageError("--mixed_precision fp16 needs a GPU; use no or bf16 on the CPU")
    return device_type, precision


def adamw(parameters, **kwargs):
    """torch's AdamW with its fused kernel (one pass over every parameter) where this torch
    has one for the parameters' device: CUDA, and the CPU from torch 2.4."""
    parameters = list(parameters)
    try:
        return torch.optim.AdamW(parameters, fused=True, **kwargs)
    except RuntimeError:  # no fused kernel for this device in this torch
        return torch.optim.AdamW(parameters, **kwargs)


def cosine_schedule(optimizer, warmup_steps, max_steps, num_processes):
    """Linear warmup then cosine decay, in optimiser steps. A prepared scheduler advances
    once per process per optimiser step, hence the scaling."""
    from diffusers.optimization import get_scheduler

    return get_scheduler("cosine", optimizer, num_warmup_steps=warmup_steps * num_processes,
                         num_training_steps=max_steps * num_processes)


def make_accelerator(device, mixed_precision, gradient_accumulation_steps, report_to, project_dir):
    """An Accelerator for a resolved device type ("cpu" or "cuda") and precision."""
    from accelerate import Accelerator

    log_with = None if report_to == "none" else report_to
    if log_with and importlib.util.find_spec(log_with) is None:
        raise UsageError(f"--report_to {log_with} needs the {log_with} package: pip install {log_with}")
    return Accelerator(
        cpu=device == "cpu",
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        log_with=log_with,
        project_dir=str(project_dir),
    )


class MetricsLog:
    """Append-only JSONL of metrics (rank 0 only), mirrored to accelerate's trackers."""

    def __init__(self, accelerator, output_dir):
        self.accelerator = accelerator
        self.path = Path(output_dir) / "logs" / "metrics.jsonl"
        if accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, step, **values):
        values = {k: float(v) for k, v in values.items()}
        if self.accelerator.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")
        self.accelerator.log(values, step=step)

    def read(self):
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate_after(self, step):
        """On resume, forget what a killed run logged after its last checkpoint."""
        if self.accelerator.is_main_process and self.path.exists():
            kept = [json.dumps(r) for r in self.read() if r["step"] <= step]
            with atomic_path(self.path) as tmp:
                tmp.write_text("".join(line + "\n" for line in kept))


def plot_curves(records, path, keys):
    """One panel per metric against the step, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(k in r for r in records)]
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(r["step"], r[key]) for r in records if key in r]
        ax.plot(*zip(*points), marker="." if len(points) < 30 else None)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def checkpoints(output_dir):
    """Complete checkpoints of a run, oldest first."""
    folder = Path(output_dir) / "checkpoints"
    found = []
    if folder.is_dir():
        for path in folder.iterdir():
            match = CHECKPOINT_PATTERN.match(path.name)
            if match and (path / TRAINING_STATE).exists():
                found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def save_checkpoint(accelerator, output_dir, step, limit, state=None):
    """Full training state at `step`: written to a temporary folder, renamed when
    complete, then the oldest beyond `limit` are removed."""
    final = Path(output_dir) / "checkpoints" / f"checkpoint-{step:06d}"
    partial = final.with_name(final.name + ".partial")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.parent.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    # Every rank writes its own RNG state into the folder: rename only when all are done,
    # or a late rank recreates `partial` beside the renamed checkpoint.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(partial / TRAINING_STATE, {"step": step, **(state or {})})
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        if limit:
            for old in checkpoints(output_dir)[:-limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def find_checkpoint(output_dir, resume):
    """The checkpoint folder for --resume_from_checkpoint latest|PATH, or None."""
    if not resume:
        return None
    if resume == "latest":
        found = checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / TRAINING_STATE).exists():
        raise UsageError(f"--resume_from_checkpoint {resume} is not a complete checkpoint folder")
    return path


def load_checkpoint(accelerator, path):
    accelerator.load_state(str(path))
    return json.loads((Path(path) / TRAINING_STATE).read_text())


class EpochSampler(torch.utils.data.Sampler):
    """A shuffled order that depends only on (seed, epoch): resuming mid-epoch replays
    the same order, and every process draws the same permutation before sharding."""

    def __init__(self, length, seed, weights=None):
        self.length = length
        self.seed = seed
        self.weights = weights  # per item: an epoch draws `length` items with replacement in proportion
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.length

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.weights is not None:
            return iter(torch.multinomial(self.weights, self.length, replacement=True, generator=generator).tolist())
        return iter(torch.randperm(self.length, generator=generator).tolist())


def user_weights(labels):
    """Per-item weights that draw every user equally often, however many images each has."""
    labels = torch.as_tensor(labels)
    return 1.0 / torch.bincount(labels)[labels].double()


def train_loader(dataset, batch_size, seed, num_workers=0, weights=None):
    """Shuffled full batches in an order fixed by (seed, epoch); with `weights`, drawn in proportion to them."""
    # Its own generator: creating a loader iterator must not draw from the global RNG,
    # or a resumed run (which creates one more iterator) would sample other noise.
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochSampler(len(dataset), seed, weights),
        drop_last=True,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )


def epoch_batches(accelerator, loader, epoch, skip=0):
    """The prepared loader's batches of `epoch`, without the first `skip` (on resume).

    Accelerate's loaders set their sampler's epoch from their own iteration counter when
    iterated, so the epoch is set on the loader itself, and again on the skipping loader
    that `skip_first_batches` makes, or a resumed run would replay epoch 0's order.
    """
    loader.set_epoch(epoch)
    if not skip:
        return loader
    skipping = accelerator.skip_first_batches(loader, skip)
    skipping.set_epoch(epoch)
    return skipping


def total_steps(max_train_steps, num_epochs, batches_per_epoch, gradient_accumulation_steps):
    """(optimiser steps of a run, steps per epoch): --max_train_steps, else --num_epochs worth."""
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / gradient_accumulation_steps))
    if max_train_steps:
        return max_train_steps, steps_per_epoch
    return num_epochs * steps_per_epoch, steps_per_epoch


def resume_point(output_dir, resume, config=None, architecture=(), unrecorded=None):
    """The checkpoint to resume from (or None), refusing to start over a finished or
    checkpointed run unless --resume_from_checkpoint says so, and to resume a run whose
    config.json has other `architecture` settings than `config` (its weights would not load).
    `unrecorded`: what a setting was in runs whose config.json predates it."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"--output_dir {output_dir} is a file")
    resume_from = find_checkpoint(output_dir, resume)
    if resume_from is None and (checkpoints(output_dir) or (output_dir / "final_model").exists()):
        raise UsageError(f"{output_dir} already holds a run: add --resume_from_checkpoint latest, or choose another --output_dir")
    stored_path = Path(resume_from).parents[1] / "config.json" if resume_from is not None else None
    if stored_path is not None and stored_path.is_file() and config is not None:
        stored = {**(unrecorded or {}), **json.loads(stored_path.read_text())}
        current = config.to_dict()
        differ = [name for name in architecture if name in stored and stored[name] != current.get(name)]
        if differ:
            was = ", ".join(f"{name} {stored[name]} (now {current.get(name)})" for name in differ)
            raise UsageError(f"{resume_from} was trained with other model settings: {was}; resume with the run's "
                             f"settings (the --flags, or the project version of that run), or choose another "
                             f"--output_dir")
    return resume_from


def write_run_config(accelerator, output_dir, config, max_steps, tracker_name, **extra):
    """config.json (the resolved configuration plus the run's facts), and the trackers when
    asked. Main process only; returns what was written."""
    written = {**config.to_dict(), **extra, "num_processes": accelerator.num_processes}
    written["effective_batch_size"] = config.batch_size * config.gradient_accumulation_steps * accelerator.num_processes
    written["max_train_steps_resolved"] = max_steps
    write_json(Path(output_dir) / "config.json", written)
    if config.report_to != "none":
        # Trackers take scalar hyperparameters only.
        scalars = {k: v for k, v in written.items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(tracker_name, config=scalars)
    return written


class NonFiniteLoss(Exception):
    """A NaN or infinite loss; `train_loop` turns it into a RunFailed that names the step."""


def optimise(accelerator, loss, parameters, optimizer, lr_scheduler=None, max_grad_norm=None):
    """One backward pass and (when gradients sync) optimiser step, inside accelerate's
    accumulate context. A non-finite loss stops before it touches the weights."""
    if not torch.isfinite(loss):
        raise NonFiniteLoss(loss.item())
    accelerator.backward(loss)
    if accelerator.sync_gradients and max_grad_norm:
        accelerator.clip_grad_norm_(parameters, max_grad_norm)
    optimizer.step()
    if lr_scheduler is not None:
        lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def start_run(accelerator, output_dir, resume_from, seed):
    """(first step, metrics log): the step of the checkpoint resumed from (0 for a new run),
    with whatever a killed run logged after it forgotten.

    Called once the models are built (from one seed: the same weights on every process).
    From here every process draws its own noise, timesteps and condition dropout: rank 0
    goes on with the single-process stream, rank r > 0 is reseeded from (seed, r), or two
    GPUs would draw the same randomness for different images. A resumed run restores every
    rank's stream from the checkpoint instead."""
    if accelerator.process_index > 0:
        torch.manual_seed(seed * 1_000_003 + accelerator.process_index)
    step = load_checkpoint(accelerator, resume_from)["step"] if resume_from is not None else 0
    metrics = MetricsLog(accelerator, output_dir)
    metrics.truncate_after(step)
    return step, metrics


def train_loop(accelerator, loader, train_step, *, modules, lr_scheduler, metrics, output_dir, start_step, max_steps,
               steps_per_epoch, gradient_accumulation_steps, checkpointing_steps, checkpoints_total_limit,
               validation_steps, validate, curve_keys, desc, heldout_steps=0, heldout=None):
    """The optimiser-step loop every trainer runs, from `start_step` to `max_steps`.

    `train_step(batch, step)` runs forward, loss and `optimise` for one batch inside
    accelerate's accumulate context over `modules`, and returns the logged terms (with
    "loss"). The loop owns the rest: the epoch order on resume, the gradient-sync gate,
    the metrics log and progress bar, checkpoints every `checkpointing_steps` and at the
    end, `validate(step)` on the main process every `validation_steps` (its returned line
    is printed) with the curves redrawn, `heldout(step)` on the main process every
    `heldout_steps` (returns a dict of held-out metrics, logged, and whether to stop: then
    every process stops there, checkpointed), the stop on a non-finite loss, and the save
    on Ctrl-C. Returns the last step."""
    step = last_saved = start_step
    stopped = False
    progress = tqdm(total=max_steps, initial=step, desc=desc, disable=not accelerator.is_main_process)
    try:
        while step < max_steps and not stopped:
            epoch, done_in_epoch = divmod(step, steps_per_epoch)
            for batch in epoch_batches(accelerator, loader, epoch, done_in_epoch * gradient_accumulation_steps):
                with accelerator.accumulate(*modules):
                    terms = train_step(batch, step)
                if not accelerator.sync_gradients:
                    continue
                step += 1
                values = {name: value.item() if torch.is_tensor(value) else float(value) for name, value in terms.items()}
                lr = lr_scheduler.get_last_lr()[0]
                metrics.log(step, lr=lr, **values)
                progress.update(1)
                progress.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}")
                if step % checkpointing_steps == 0 or step == max_steps:
                    save_checkpoint(accelerator, output_dir, step, checkpoints_total_limit)
                    last_saved = step
                if heldout and (step % heldout_steps == 0 or step == max_steps):
                    if accelerator.is_main_process:
                        measured, stopped = heldout(step)
                        metrics.log(step, **measured)
                        progress.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}",
                                             **{name: f"{value:.4f}" for name, value in measured.items()})
                    # The main process decides; every process must leave the loop at the same step.
                    flag = torch.tensor([float(stopped)], device=accelerator.device)
                    stopped = bool(accelerator.reduce(flag, reduction="sum").item())
                    if stopped and step > last_saved:
                        save_checkpoint(accelerator, output_dir, step, checkpoints_total_limit)
                        last_saved = step
                if accelerator.is_main_process and (step % validation_steps == 0 or step == max_steps):
                    progress.write(validate(step))
                    plot_curves(metrics.read(), Path(output_dir) / "logs" / "curves.png", curve_keys)
                accelerator.wait_for_everyone()
                if step >= max_steps or stopped:
                    break
    except NonFiniteLoss as error:
        saved = checkpoints(output_dir)
        raise RunFailed(
            f"loss became {error.args[0]} at step {step}; the last good checkpoint is "
            f"{saved[-1] if saved else 'none'}; try a lower --learning_rate or --mixed_precision no"
        ) from None
    except KeyboardInterrupt:
        if step > last_saved:
            save_checkpoint(accelerator, output_dir, step, checkpoints_total_limit)
            print(f"\ninterrupted: saved step {step}; resume with --resume_from_checkpoint latest", file=sys.stderr)
        raise
    finally:
        progress.close()
    return step
