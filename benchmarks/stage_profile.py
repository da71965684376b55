"""Where a preset's time goes: per step of the VAE, the diffusion model, generation and
the evaluation's classifier, the seconds spent loading data, in forward passes, in backward
passes, in the optimiser and in the rest (loss terms, clipping, EMA, schedule, sampler,
batch preparation), and what the preset's step counts imply for each stage. Beside the
seconds, the work: GFLOP per step (convolutions, matrix products and attention, counted by
torch's FlopCounterMode; element-wise operations are not counted), the GFLOP/s that makes,
as a share of this machine's matrix-product peak in the stage's precision and threads, and
the stage's floor, its FLOPs at that peak. A stage near its peak gets faster only by doing
less work (fewer or smaller steps), not by faster kernels.

    python benchmarks/stage_profile.py --preset quick             # the quick pipeline's stages
    python benchmarks/stage_profile.py --preset quick --steps 2   # a smoke run

Each stage runs its own training step (utils.vae.build_vae_training,
utils.diffusion.build_diffusion_training, utils.classifier.train_classifier) on random
inputs of the preset's shapes; the phases are timed from the outside, by global hooks on
the outermost module call, `Tensor.backward` and optimiser steps, so the step code is the
trainers' own. Data: decoding and resizing a batch of simulated PNGs (the first epoch;
later epochs read the in-memory cache). Generation: one sampler step of a batch of 64 (the pipeline's
generate batch; the UNet sees 128 with guidance), the VAE's decoding of that batch shared
among the preset's sampler steps, for the preset's images of --num_users users. The
classifier runs on one thread, as each of the evaluation's side-by-side processes does, and
its implied time is the evaluation's classifier steps (utils.evaluation.evaluation_jobs for
a 31-user, 105-per-user split with 20 generated images per user) over the processes.
"""

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # run as `python benchmarks/stage_profile.py`: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.utils.flop_counter import FlopCounterMode
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from benchmarks._measure import add_output_arguments, publish, seconds_per_call, synchronize
from utils.cli import UsageError, resolve_device, run
from utils.presets import PRESET_NAMES, PRESETS
from utils.training import cpu_model

PHASES = ("data", "forward", "backward", "optimiser", "other")
PRECISION_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class PhaseClock:
    """Seconds spent in forward passes (outermost module calls), `Tensor.backward` and
    optimiser steps while active; `other` is the rest of each timed step."""

    def __init__(self, device):
        self.device, self.seconds, self.depth = device, dict.fromkeys(PHASES, 0.0), 0

    def _now(self):
        synchronize(self.device)
        return time.perf_counter()

    @contextlib.contextmanager
    def active(self):
        def pre_forward(module, args):
            self.depth += 1
            if self.depth == 1:
                self._forward_started = self._now()

        def post_forward(module, args, output):
            self.depth -= 1
            if self.depth == 0:
                self.seconds["forward"] += self._now() - self._forward_started

        def pre_step(optimizer, args, kwargs):
            self._step_started = self._now()

        def post_step(optimizer, args, kwargs):
            self.seconds["optimiser"] += self._now() - self._step_started

        backward = torch.Tensor.backward

        def timed_backward(tensor, *args, **kwargs):
            started = self._now()
            backward(tensor, *args, **kwargs)
            self.seconds["backward"] += self._now() - started

        handles = [torch.nn.modules.module.register_module_forward_pre_hook(pre_forward),
                   torch.nn.modules.module.register_module_forward_hook(post_forward),
                   register_optimizer_step_pre_hook(pre_step), register_optimizer_step_post_hook(post_step)]
        torch.Tensor.backward = timed_backward
        try:
            yield self
        finally:
            torch.Tensor.backward = backward
            for handle in handles:
                handle.remove()

    def per_step(self, total_seconds, steps, data_seconds=0.0):
        """Seconds per step of each phase, `other` being what the hooks did not see."""
        timed = {name: value / steps for name, value in self.seconds.items()}
        timed["data"] = data_seconds
        timed["other"] = total_seconds / steps - sum(timed[name] for name in ("forward", "backward", "optimiser"))
        return timed


def gflop(function):
    """GFLOP of one call of `function()`: convolutions, matrix products and attention."""
    with FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops() / 1e9


def peak_gflops(device, dtype, threads):
    """This machine's matrix-product GFLOP/s in `dtype` on `threads` threads (a CPU) or on the GPU:
    the best of a few 1024x1024 (GPU: 4096x4096) products, the ceiling a stage's FLOPs run against."""
    size = 4096 if device.type == "cuda" else 1024
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        best = min(seconds_per_call(lambda: a @ b, 1, 1, device) for _ in range(5))
    finally:
        torch.set_num_threads(saved)
    return 2 * size**3 / best / 1e9


def work(flops_per_step, device, dtype, threads):
    return {"gflop_per_step": flops_per_step, "peak_gflops": peak_gflops(device, dtype, threads)}


def timed_steps(step, steps, device):
    """(PhaseClock, seconds per step) of `steps` calls of `step()` after one untimed call."""
    step()
    clock = PhaseClock(device)
    with clock.active():
        started = clock._now()
        for _ in range(steps):
            step()
        total = clock._now() - started
    return clock, total


def data_seconds_per_batch(data_dir, resolution, batch_size):
    """Decoding and resizing one batch of PNGs, as a trainer's first epoch does."""
    from utils.data_loader import SpectrogramDataset, build_manifest

    dataset = SpectrogramDataset(data_dir, build_manifest(data_dir), "train", resolution)
    count = min(len(dataset), batch_size)
    started = time.perf_counter()
    for index in range(count):
        dataset[index]
    return (time.perf_counter() - started) / count * batch_size


def fresh_accelerator(config, scratch):
    """An Accelerator of the stage's own precision: accelerate keeps one state per process,
    so the previous stage's is dropped first (with accelerate's own reset, as its tests do)."""
    from accelerate.state import AcceleratorState

    from utils.training import make_accelerator

    AcceleratorState._reset_state(reset_partial_state=True)
    return make_accelerator(config.device, config.mixed_precision, 1, "none", scratch)


def profile_vae(preset, steps, device, data_dir):
    from utils.vae import build_vae_training, resolve_vae_config

    config = resolve_vae_config({"preset": preset, "device": device})
    with tempfile.TemporaryDirectory() as scratch:
        accelerator = fresh_accelerator(config, scratch)
    torch.manual_seed(0)
    training = build_vae_training(config, accelerator, max_steps=steps + 1)
    batch = {"pixel_values": torch.rand(config.batch_size, 3, config.resolution, config.resolution,
                                        device=accelerator.device) * 2 - 1}

    def step():
        with accelerator.accumulate(*training.modules):
            training.step(batch, 0)

    clock, total = timed_steps(step, steps, accelerator.device)
    data = data_seconds_per_batch(data_dir, config.resolution, config.batch_size)
    return {"stage": "VAE", "setting": f"{config.resolution}px, batch {config.batch_size}, {config.mixed_precision}",
            "phases": clock.per_step(total, steps, data), "steps": config.max_train_steps, "parallel": 1,
            **work(gflop(step), accelerator.device, PRECISION_DTYPES[config.mixed_precision], torch.get_num_threads())}


def profile_diffusion(preset, steps, device, num_users):
    from utils.diffusion import build_diffusion_training, resolve_diffusion_config

    from utils.vae import ARCHITECTURE, build_vae, resolve_vae_config

    # The preset's VAE decides the latent shape, as in train_diffusion.py.
    vae_config = build_vae(**resolve_vae_config({"preset": preset, "device": device}).pick(*ARCHITECTURE)).config
    config = resolve_diffusion_config({"preset": preset, "device": device}, vae_config)
    shape = config.latent_shape
    with tempfile.TemporaryDirectory() as scratch:
        accelerator = fresh_accelerator(config, scratch)
    torch.manual_seed(0)
    training = build_diffusion_training(config, accelerator, num_users, num_users, steps + 1)
    latents = torch.randn(config.batch_size, *shape, device=accelerator.device)
    batch = {"mean": latents, "std": torch.full_like(latents, 0.1),
             "user_index": torch.randint(0, num_users, (config.batch_size,), device=accelerator.device)}

    def step():
        with accelerator.accumulate(*training.modules):
            training.step(batch, 0)

    clock, total = timed_steps(step, steps, accelerator.device)
    # The latents are cached once before training (on the order of a VAE epoch of encoding), so a step reads memory.
    return {"stage": "diffusion", "setting": f"latents {'x'.join(map(str, shape))}, batch {config.batch_size}, "
                                             f"{config.mixed_precision}",
            "phases": clock.per_step(total, steps), "steps": config.max_train_steps, "parallel": 1,
            **work(gflop(step), accelerator.device, PRECISION_DTYPES[config.mixed_precision], torch.get_num_threads())}


def profile_generation(preset, steps, device, num_users, batch_size=64):
    """One sampler step of a batch (with guidance), plus the batch's decoding shared among the preset's steps."""
    from argparse import Namespace

    from benchmarks.generation_speed import random_pipeline
    from utils.sampling import decode_latents, inference_dtype, make_sampler, sample_latents

    device = torch.device(device)
    dtype = inference_dtype("auto", device)
    pipe = random_pipeline(Namespace(preset=preset, resolution=None, num_users=num_users, guidance_scale=3.0))
    pipe.to(dtype=dtype).to(device)
    images = num_users * PRESETS[preset]["pipeline"]["images_to_generate"]
    batch_size = min(batch_size, images)
    sampler_steps = PRESETS[preset]["diffusion"]["num_inference_steps"]
    users = torch.arange(batch_size, device=device) % num_users
    scheduler = make_sampler(pipe.scheduler.config, pipe.config.sampler)

    def sample(count):
        return sample_latents(pipe.unet, pipe.condition_encoder, scheduler, users, range(batch_size),
                              pipe.config.latent_shape, 3.0, count)

    with torch.no_grad():
        clock, total = timed_steps(lambda: sample(steps), 1, device)
        latents = sample(1)
        decode, decode_seconds = timed_steps(lambda: decode_latents(pipe.vae, latents, 1.0), 1, device)
        flops = gflop(lambda: sample(1)) + gflop(lambda: decode_latents(pipe.vae, latents, 1.0)) / sampler_steps
    phases = clock.per_step(total, steps)
    phases["forward"] += decode.seconds["forward"] / sampler_steps
    phases["other"] += (decode_seconds - decode.seconds["forward"]) / sampler_steps
    batches = -(-images // batch_size)
    return {"stage": f"generation ({images} images)",
            "setting": f"batch {batch_size}, {sampler_steps} steps, guidance 3, {str(dtype).replace('torch.', '')}",
            "phases": phases, "steps": batches * sampler_steps, "parallel": 1,
            **work(flops, device, dtype, torch.get_num_threads())}


def evaluation_steps(preset, num_users, train_per_user, generated_per_user):
    """Classifier steps the preset's evaluation trains, for a split of that shape."""
    from utils.evaluation import evaluation_jobs

    evaluation, settings = PRESETS[preset]["evaluation"], PRESETS[preset]["classifier"]

    def split(per_user):
        return torch.zeros(num_users * per_user, 3, 1, 1, dtype=torch.uint8), torch.arange(num_users).repeat(per_user)

    train, generated = split(train_per_user), split(generated_per_user)
    budgets = [str(b) for b in evaluation["budgets"]]
    jobs = evaluation_jobs(train, split(1), generated, budgets, evaluation["gain_seeds"], evaluation["num_seeds"],
                           evaluation["classic_augmentation"], settings["max_train_steps"],
                           (train, split(1)) if evaluation["vae_classifiers"] else None)
    return len(jobs), sum(job.steps(settings) for job in jobs.values())


def profile_classifier(preset, steps, device, num_users):
    from utils.classifier import resolve_precision, train_classifier

    settings = {**PRESETS[preset]["classifier"], "eval_every": 10**9}
    settings["mixed_precision"] = resolve_precision(settings["mixed_precision"], device)
    resolution, count = settings["resolution"], num_users * 105
    generator = torch.Generator().manual_seed(0)
    train = (torch.randint(0, 256, (count, 3, resolution, resolution), generator=generator, dtype=torch.uint8),
             torch.arange(num_users).repeat(105))
    val = (train[0][:num_users], train[1][:num_users])
    threads = torch.get_num_threads()
    processes = 1 if torch.device(device).type != "cpu" else threads
    torch.set_num_threads(1 if processes > 1 else threads)  # as each of the evaluation's processes

    def training(max_train_steps):
        train_classifier(train, val, list(range(num_users)), {**settings, "max_train_steps": max_train_steps}, seed=0,
                         device=device, progress=False)

    try:
        clock, total = timed_steps(lambda: training(steps), 1, torch.device(device))
        # Two steps less one: a training step without the validation pass that ends every run.
        flops = gflop(lambda: training(2)) - gflop(lambda: training(1))
        measured = work(flops, torch.device(device), PRECISION_DTYPES[settings["mixed_precision"]],
                        torch.get_num_threads())
    finally:
        torch.set_num_threads(threads)
    trainings, all_steps = evaluation_steps(preset, num_users, 105, 20)
    return {"stage": f"evaluation classifiers ({trainings} trainings)",
            "setting": f"{resolution}px, batch {settings['batch_size']}, {settings['mixed_precision']}"
                       + (f", {processes} x 1 thread" if processes > 1 else ""),
            "phases": clock.per_step(total, steps), "steps": all_steps, "parallel": processes, **measured}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Per-step phase times of each training stage (see the module docstring).")
    p.add_argument("--preset", choices=PRESET_NAMES, default="quick")
    p.add_argument("--steps", type=int, default=5, help="timed steps per stage (default 5)")
    p.add_argument("--num_users", type=int, default=31)
    add_output_arguments(p)
    return p.parse_args(argv)


def markdown(rows):
    lines = ["| stage | setting | data | forward | backward | optimiser | other | per step | GFLOP/step "
             "| GFLOP/s (of peak) | steps | implied | floor |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        phases = row["phases"]
        per_step = sum(phases.values())
        rate = row["gflop_per_step"] / per_step * row["parallel"]
        lines.append(f"| {row['stage']} | {row['setting']} | "
                     + " | ".join(f"{phases[name] * 1000:.0f} ms" for name in PHASES)
                     + f" | {per_step * 1000:.0f} ms | {row['gflop_per_step']:.3g} | {rate:.3g} "
                       f"({rate / (row['peak_gflops'] * row['parallel']):.0%}) | {row['steps']} "
                       f"| {row['implied_minutes']:.1f} min | {row['floor_minutes']:.1f} min |")
    implied, floor = (sum(row[key] for row in rows) for key in ("implied_minutes", "floor_minutes"))
    lines.append(f"| **all** | | | | | | | | | | | **{implied:.1f} min** | {floor:.1f} min |")
    return "\n".join(lines)


def main(args):
    if args.steps < 1 or args.num_users < 2:
        raise UsageError("--steps must be at least 1 and --num_users at least 2")
    device = resolve_device(args.device).type
    with tempfile.TemporaryDirectory() as scratch:
        from utils.gait_simulator import SimulationSettings, write_dataset

        data_dir = Path(scratch) / "data"
        write_dataset(data_dir, SimulationSettings(num_users=2, images_per_user=PRESETS[args.preset]["vae"]["batch_size"],
                                                   resolution=PRESETS[args.preset]["pipeline"]["resolution"]),
                      progress=False)
        rows = [profile_vae(args.preset, args.steps, device, data_dir),
                profile_diffusion(args.preset, args.steps, device, args.num_users),
                profile_generation(args.preset, args.steps, device, args.num_users),
                profile_classifier(args.preset, args.steps, device, args.num_users)]
    for row in rows:
        row["implied_minutes"] = sum(row["phases"].values()) * row["steps"] / row["parallel"] / 60
        # Side-by-side processes each run at their one thread's peak.
        row["floor_minutes"] = row["gflop_per_step"] * row["steps"] / (row["peak_gflops"] * row["parallel"]) / 60
    table = markdown(rows)
    cpu = cpu_model()
    return publish({"preset": args.preset, "device": device, "cpu": cpu, "rows": rows},
                   f"{args.preset} preset on {device} ({cpu}, {torch.get_num_threads()} threads):\n{table}", args.out)


if __name__ == "__main__":
    run(main, parse_args())
