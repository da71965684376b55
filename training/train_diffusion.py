"""Stage 2: a latent diffusion model conditioned on the user.

    python training/train_diffusion.py --data_dir data/simulated \\
        --vae_path outputs/vae/final_model --output_dir outputs/diffusion --preset quick
    python training/train_diffusion.py ... --resume_from_checkpoint latest

Users and the split come from the manifest stored with the VAE, so labels mean the
same in every stage and the test split stays unseen (DESIGN.md, pitfall 1). The train
split is encoded once into a latent cache (posterior mean and std, scaled by the VAE's
measured factor), so a training step never runs the VAE. The condition encoder maps a
user index to a few cross-attention tokens; per sample, with --condition_dropout, the
index becomes the null token `num_users` that classifier-free guidance uses (pitfall 2).
Loss: MSE on epsilon or v, optionally Min-SNR weighted (Hang et al., 2023); DDPM
schedule with Stable Diffusion's scaled-linear betas; EMA of the UNet and the encoder.
"""

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

if not __package__:  # run as `python training/train_diffusion.py`: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from utils.cli import UsageError, run
from utils.condition_encoder import UserConditionEncoder, drop_conditions
from utils.data_loader import MANIFEST_NAME, SpectrogramDataset, check_data_dir
from utils.files import atomic_folder, atomic_path
from utils.image_grid import labelled_grid, to_pil
from utils.presets import PRESET_NAMES, resolve_preset
from utils.sampling import GENERATOR_INFO, decode_latents, make_sampler, sample_latents
from utils.training import (
    adamw,
    check_finite,
    resume_point,
    write_run_config,
    MetricsLog,
    epoch_batches,
    load_checkpoint,
    make_accelerator,
    plot_curves,
    save_checkpoint,
    total_steps,
    train_loader,
    write_json,
)
from utils.vae import load_vae, load_vae_manifest

CACHE_FILE = "latent_cache/train.safetensors"


class ConditionalDenoiser(torch.nn.Module):
    """UNet and condition encoder as one module, so that DDP, autocast and EMA see both."""

    def __init__(self, unet, condition_encoder):
        super().__init__()
        self.unet = unet
        self.condition_encoder = condition_encoder

    def forward(self, noisy_latents, timesteps, user_indices):
        tokens = self.condition_encoder(user_indices)  # (B, tokens, cross_attention_dim)
        return self.unet(noisy_latents, timesteps, encoder_hidden_states=tokens).sample


def build_unet(args, latent_channels, latent_size):
    from diffusers import UNet2DConditionModel

    levels = len(args.block_out_channels)
    # Cross-attention on every level but the first (the largest, where attention costs most).
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1)
    up = ("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",)
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(args.block_out_channels),
        layers_per_block=args.layers_per_block,
        cross_attention_dim=args.cross_attention_dim,
        attention_head_dim=args.attention_head_dim,
        norm_num_groups=args.norm_num_groups,
    )


def build_noise_scheduler(args):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=args.num_train_timesteps,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=args.prediction_type,
        clip_sample=False,
    )


def cache_key(vae_path, data_dir, manifest, resolution):
    """sha256 of the VAE weights and config, the train split's file names and bytes and
    the resolution: the cache is rebuilt when any of them changes."""
    digest = hashlib.sha256()
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        path = Path(vae_path) / name
        if path.exists():
            digest.update(path.read_bytes())
    digest.update(str(resolution).encode())
    for relative_path, label in manifest.samples("train"):
        digest.update(f"{relative_path}\0{label}\0".encode())
        path = Path(data_dir) / relative_path
        digest.update(path.read_bytes() if path.exists() else b"missing")
    return digest.hexdigest()


@torch.no_grad()
def encode_train_split(vae, dataset, scaling_factor, batch_size, device, show_progress):
    """Posterior mean and std of every train image, in diffusion units (x scaling_factor)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    means, stds, labels = [], [], []
    for batch in tqdm(loader, desc="encoding the train split", disable=not show_progress):
        posterior = vae.encode(batch["pixel_values"].to(device)).latent_dist
        means.append((posterior.mean * scaling_factor).float().cpu())
        stds.append((posterior.std * scaling_factor).float().cpu())
        labels.append(torch.as_tensor(batch["user_index"]))
    return {"mean": torch.cat(means).contiguous(), "std": torch.cat(stds).contiguous(), "user_index": torch.cat(labels).long()}


def load_or_build_cache(accelerator, vae, args, manifest, output_dir):
    """The run folder's latent cache when its key matches, else a freshly encoded one.
    Written by the main process only, atomically; the others wait and read it."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = Path(output_dir) / CACHE_FILE
    key = cache_key(args.vae_path, args.data_dir, manifest, args.resolution)
    if accelerator.is_main_process:
        stored_key = None
        if path.exists():
            with safe_open(str(path), framework="pt") as f:
                stored_key = (f.metadata() or {}).get("key")
        if stored_key != key:
            if stored_key is not None:
                print("the VAE or the data changed since the latent cache was written: encoding again")
            dataset = SpectrogramDataset(args.data_dir, manifest, "train", args.resolution)
            cache = encode_train_split(vae.to(accelerator.device), dataset, vae.config.scaling_factor,
                                       args.batch_size, accelerator.device, show_progress=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                save_file(cache, str(tmp), metadata={"key": key, "scaling_factor": str(vae.config.scaling_factor)})
    accelerator.wait_for_everyone()
    return load_file(str(path))


class LatentDataset(torch.utils.data.Dataset):
    def __init__(self, cache):
        self.cache = cache

    def __len__(self):
        return len(self.cache["user_index"])

    def __getitem__(self, index):
        return {key: value[index] for key, value in self.cache.items()}


def diffusion_loss(prediction, target, timesteps, noise_scheduler, args):
    """Mean squared error per sample, Min-SNR-gamma weighted when --snr_gamma is set:
    weight = min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v (Hang et al., 2023)."""
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if not args.snr_gamma:
        return per_sample.mean()
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    weight = torch.clamp(snr, max=args.snr_gamma)
    weight = weight / (snr + 1) if args.prediction_type == "v_prediction" else weight / snr
    return (weight * per_sample).mean()


def validation_users(manifest, count):
    """`count` users spread evenly over the label map (all when count >= num_users)."""
    count = min(count, manifest.num_users)
    return [manifest.users[round(i * (manifest.num_users - 1) / max(1, count - 1))] for i in range(count)]


@torch.no_grad()
def validate(accelerator, denoiser, vae, noise_scheduler, args, manifest, step, output_dir, latent_shape):
    """A grid: one row per validation user (name in the margin), a real train image of
    that user first, then one generated image per seed."""
    denoiser.eval()
    users = validation_users(manifest, args.validation_users)
    seeds = list(range(args.validation_seeds))
    indices = torch.tensor([manifest.label_map[u] for u in users for _ in seeds], device=accelerator.device)
    all_seeds = [seed for _ in users for seed in seeds]
    sampler = make_sampler(noise_scheduler.config, "dpmsolver")
    with accelerator.autocast():
        latents = sample_latents(denoiser.unet, denoiser.condition_encoder, sampler, indices, all_seeds, latent_shape,
                                 args.guidance_scale, args.num_inference_steps)
        images = decode_latents(vae, latents, vae.config.scaling_factor).cpu()
    denoiser.train()
    real = SpectrogramDataset(args.data_dir, manifest, "train", args.resolution)
    first_of_user = {}
    for position, (relative_path, label) in enumerate(real.samples):
        first_of_user.setdefault(label, position)
    rows = []
    for row, user in enumerate(users):
        generated = [to_pil(image) for image in images[row * len(seeds):(row + 1) * len(seeds)]]
        rows.append([to_pil(real[first_of_user[manifest.label_map[user]]]["pixel_values"])] + generated)
    with atomic_path(Path(output_dir) / "samples" / f"step-{step:06d}.png") as tmp:
        labelled_grid(rows, users, cell_size=max(args.resolution, 128)).save(tmp, format="PNG")


def save_final_model(denoiser, noise_scheduler, args, manifest, output_dir, latent_shape):
    """final_model/: everything generation needs, loadable without the data folder.

    vae/ (the stage-1 final_model, copied), unet/ and condition_encoder/ (save_pretrained,
    EMA weights when --use_ema), condition_encoder.pt (plain state_dict, for the original
    three-path command), scheduler/, generator.json (label map, null index, latent
    scaling and shape, resolution, sampling defaults) and the dataset manifest."""
    final = Path(output_dir) / "final_model"
    with atomic_folder(final) as partial:
        shutil.copytree(args.vae_path, partial / "vae")
        denoiser.unet.save_pretrained(partial / "unet", safe_serialization=True)
        denoiser.condition_encoder.save_pretrained(partial / "condition_encoder", safe_serialization=True)
        torch.save(denoiser.condition_encoder.state_dict(), partial / "condition_encoder.pt")
        noise_scheduler.save_pretrained(partial / "scheduler")
        write_json(partial / GENERATOR_INFO, {
            "users": manifest.users,
            "label_map": manifest.label_map,
            "num_users": manifest.num_users,
            "null_index": manifest.null_index,
            "resolution": args.resolution,
            "latent_shape": list(latent_shape),
            "scaling_factor": args.latent_scaling_factor,
            "prediction_type": args.prediction_type,
            "guidance_scale": args.guidance_scale,
            "num_inference_steps": args.num_inference_steps,
            "ema": bool(args.use_ema),
        })
        manifest.save(partial / MANIFEST_NAME)
    return final


def check_arguments(args):
    bad = [c for c in args.block_out_channels if c % args.norm_num_groups]
    if bad:
        raise UsageError(f"--block_out_channels {bad} must be multiples of --norm_num_groups {args.norm_num_groups}")
    if not 0 <= args.condition_dropout < 1:
        raise UsageError(f"--condition_dropout must be in [0, 1), got {args.condition_dropout}")
    for name in ("batch_size", "gradient_accumulation_steps", "layers_per_block", "cross_attention_dim",
                 "num_condition_tokens", "num_train_timesteps", "num_inference_steps"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1")
    if not (args.max_train_steps or args.num_epochs):
        raise UsageError("give --max_train_steps or --num_epochs")


def check_vae_folder(args):
    """The VAE, its manifest and the resolution; every mismatch is a clear exit 2."""
    vae_path = Path(args.vae_path)
    if not vae_path.is_dir():
        raise UsageError(f"--vae_path {vae_path} does not exist; train one with training/train_vae.py first")
    manifest = load_vae_manifest(vae_path)
    vae = load_vae(vae_path)
    if args.resolution is None:
        args.resolution = vae.config.sample_size
    elif args.resolution != vae.config.sample_size:
        raise UsageError(
            f"--resolution {args.resolution} differs from the VAE's {vae.config.sample_size}: "
            "the diffusion model works at the resolution its VAE was trained at"
        )
    manifest.check_users_match(args.data_dir)
    args.latent_scaling_factor = vae.config.scaling_factor
    return vae, manifest


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Stage 2: train a user-conditioned latent diffusion model (see the module docstring).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data_dir", required=True, help="dataset folder: one subfolder of images per user")
    p.add_argument("--vae_path", required=True, help="stage-1 final_model folder (its manifest fixes users and split)")
    p.add_argument("--output_dir", required=True, help="run folder (config, latent cache, logs, samples, checkpoints, final_model)")
    p.add_argument("--preset", choices=PRESET_NAMES, default="quick", help="fills every size/schedule flag left unset")
    p.add_argument("--dry_run", action="store_true", help="print the resolved configuration and exit")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, the data order and the noise")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--resolution", type=int, help="image side; must equal the VAE's (default: the VAE's)")
    model = p.add_argument_group("model (preset)")
    model.add_argument("--block_out_channels", type=int, nargs="+", help="UNet channels per level")
    model.add_argument("--layers_per_block", type=int)
    model.add_argument("--attention_head_dim", type=int, help="attention heads per cross-attention block")
    model.add_argument("--norm_num_groups", type=int, help="GroupNorm groups; divides every channel count")
    model.add_argument("--cross_attention_dim", type=int, help="width of the condition tokens")
    model.add_argument("--num_condition_tokens", type=int, help="tokens per user condition")
    diffusion = p.add_argument_group("diffusion (preset)")
    diffusion.add_argument("--num_train_timesteps", type=int)
    diffusion.add_argument("--prediction_type", choices=["epsilon", "v_prediction"])
    diffusion.add_argument("--snr_gamma", type=float, help="Min-SNR weighting gamma (e.g. 5); 0 = plain MSE")
    diffusion.add_argument("--condition_dropout", type=float, help="share of samples trained with the null token")
    opt = p.add_argument_group("optimisation (preset)")
    opt.add_argument("--batch_size", type=int, help="latents per process per step")
    opt.add_argument("--num_epochs", type=int, help="epochs, when --max_train_steps is not given")
    opt.add_argument("--max_train_steps", type=int, help="optimiser steps; overrides --num_epochs")
    opt.add_argument("--learning_rate", type=float)
    opt.add_argument("--warmup_steps", type=int, help="linear warmup, in optimiser steps")
    opt.add_argument("--weight_decay", type=float)
    opt.add_argument("--max_grad_norm", type=float, help="gradient clipping norm")
    opt.add_argument("--gradient_accumulation_steps", type=int)
    opt.add_argument("--mixed_precision", choices=["no", "fp16", "bf16", "auto"],
                     help="auto: bf16 where the CPU or GPU computes it natively, else fp16 on a GPU, no on a CPU")
    opt.add_argument("--use_ema", action=argparse.BooleanOptionalAction, default=None, help="keep an EMA of the weights")
    opt.add_argument("--ema_decay", type=float, help="EMA decay ceiling (with warmup: 1 - (1 + step)^-2/3 until then)")
    opt.add_argument("--use_augmentation", action="store_true", help="random circular time shifts of the latents")
    run_group = p.add_argument_group("run folder")
    run_group.add_argument("--checkpointing_steps", type=int, help="save the full training state every N steps")
    run_group.add_argument("--checkpoints_total_limit", type=int, help="keep the newest N checkpoints")
    run_group.add_argument("--resume_from_checkpoint", help="'latest' or a checkpoint folder")
    run_group.add_argument("--validation_steps", type=int, help="sample a validation grid every N steps")
    run_group.add_argument("--validation_users", type=int, help="users in each validation grid")
    run_group.add_argument("--validation_seeds", type=int, help="images per user in each validation grid")
    run_group.add_argument("--num_inference_steps", type=int, help="DPM-Solver++ steps for validation samples")
    run_group.add_argument("--guidance_scale", type=float, help="classifier-free guidance for validation samples")
    run_group.add_argument("--report_to", choices=["none", "tensorboard", "wandb"], default="none")
    return p.parse_args(argv)


def main(args):
    decided = resolve_preset(args, "diffusion")
    check_arguments(args)
    check_data_dir(args.data_dir)
    vae, manifest = check_vae_folder(args)
    output_dir = Path(args.output_dir)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latent_shape = (vae.config.latent_channels, args.resolution // factor, args.resolution // factor)
    if latent_shape[1] % 2 ** (len(args.block_out_channels) - 1):
        raise UsageError(
            f"the {latent_shape[1]}x{latent_shape[2]} latents cannot be halved {len(args.block_out_channels) - 1} times "
            f"by the UNet (--block_out_channels {' '.join(map(str, args.block_out_channels))}): use fewer levels"
        )
    if args.dry_run:
        print(json.dumps({**vars(args), "latent_shape": latent_shape, "preset_filled": decided}, indent=2))
        return 0
    resume_from = resume_point(output_dir, args.resume_from_checkpoint)

    accelerator = make_accelerator(args, output_dir)
    torch.manual_seed(args.seed)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    cache = load_or_build_cache(accelerator, vae, args, manifest, output_dir)
    vae.to(accelerator.device)
    dataset = LatentDataset(cache)
    if len(dataset) < args.batch_size:
        raise UsageError(f"{len(dataset)} train images: too few for --batch_size {args.batch_size}")
    loader = accelerator.prepare(train_loader(dataset, args.batch_size, args.seed))
    # Per process: each step takes one batch on every process (the effective batch is batch x processes).
    max_steps, steps_per_epoch = total_steps(args, len(loader))

    unet = build_unet(args, latent_shape[0], latent_shape[1])
    condition_encoder = UserConditionEncoder(manifest.num_users, args.cross_attention_dim, args.num_condition_tokens)
    denoiser = ConditionalDenoiser(unet, condition_encoder)
    noise_scheduler = build_noise_scheduler(args)
    optimizer = adamw(denoiser.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    from diffusers.optimization import get_scheduler

    lr_scheduler = get_scheduler(
        "cosine",
        optimizer,
        num_warmup_steps=args.warmup_steps * accelerator.num_processes,
        num_training_steps=max_steps * accelerator.num_processes,
    )
    ema = None
    if args.use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(denoiser.parameters(), decay=args.ema_decay, use_ema_warmup=True, power=2 / 3)
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    model, optimizer, lr_scheduler = accelerator.prepare(denoiser, optimizer, lr_scheduler)
    unwrapped = accelerator.unwrap_model(model)

    step = 0
    if resume_from is not None:
        step = load_checkpoint(accelerator, resume_from)["step"]
    metrics = MetricsLog(accelerator, output_dir)
    metrics.truncate_after(step)
    if accelerator.is_main_process:
        manifest.save(output_dir / MANIFEST_NAME)
        config = write_run_config(accelerator, output_dir, args, max_steps, "train_diffusion", preset_filled=decided,
                                  latent_shape=latent_shape, num_users=manifest.num_users, null_index=manifest.null_index)
        parameters = sum(p.numel() for p in denoiser.parameters())
        print(
            f"train_diffusion: preset {args.preset}, {manifest.num_users} users (+ null token {manifest.null_index}), "
            f"{len(dataset)} cached train latents {'x'.join(map(str, latent_shape))}, {parameters / 1e6:.2f} M parameters\n"
            f"  steps {step} -> {max_steps}, effective batch {config['effective_batch_size']}, lr {args.learning_rate} "
            f"warmup {args.warmup_steps} cosine, {args.prediction_type}"
            f"{f', Min-SNR gamma {args.snr_gamma}' if args.snr_gamma else ''}, condition dropout {args.condition_dropout}, "
            f"EMA {'on' if ema else 'off'}, {accelerator.device}, precision {args.mixed_precision}"
            + (f"\n  resumed from {resume_from}" if resume_from else "")
        )

    def run_validation(step):
        if ema is not None:
            ema.store(unwrapped.parameters())
            ema.copy_to(unwrapped.parameters())
        validate(accelerator, unwrapped, vae, noise_scheduler, args, manifest, step, output_dir, latent_shape)
        if ema is not None:
            ema.restore(unwrapped.parameters())
        plot_curves(metrics.read(), output_dir / "logs" / "curves.png", ["loss", "lr"])

    last_saved = step
    progress = tqdm(total=max_steps, initial=step, desc="diffusion", disable=not accelerator.is_main_process)
    started = time.perf_counter()
    try:
        while step < max_steps:
            epoch, done_in_epoch = divmod(step, steps_per_epoch)
            for batch in epoch_batches(accelerator, loader, epoch, done_in_epoch * args.gradient_accumulation_steps):
                # A fresh posterior sample each time: the cache keeps the VAE's uncertainty.
                latents = batch["mean"] + batch["std"] * torch.randn_like(batch["std"])  # (B, C, h, w)
                if args.use_augmentation:
                    shifts = torch.randint(0, latents.shape[-1], (len(latents),)).tolist()
                    latents = torch.stack([torch.roll(z, s, dims=-1) for z, s in zip(latents, shifts)])
                noise = torch.randn_like(latents)
                timesteps = torch.randint(0, args.num_train_timesteps, (len(latents),), device=latents.device)
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                target = noise if args.prediction_type == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)
                conditions = drop_conditions(batch["user_index"], manifest.null_index, args.condition_dropout)
                with accelerator.accumulate(model):
                    prediction = model(noisy, timesteps, conditions)
                    loss = diffusion_loss(prediction, target, timesteps, noise_scheduler, args)
                    check_finite(loss, step, output_dir)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                if not accelerator.sync_gradients:
                    continue
                if ema is not None:
                    ema.step(unwrapped.parameters())
                step += 1
                metrics.log(step, loss=loss.item(), lr=lr_scheduler.get_last_lr()[0])
                progress.update(1)
                progress.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}")
                if step % args.checkpointing_steps == 0 or step == max_steps:
                    save_checkpoint(accelerator, output_dir, step, args.checkpoints_total_limit)
                    last_saved = step
                if accelerator.is_main_process and (step % args.validation_steps == 0 or step == max_steps):
                    run_validation(step)
                    progress.write(f"step {step}: validation grid samples/step-{step:06d}.png")
                accelerator.wait_for_everyone()
                if step >= max_steps:
                    break
    except KeyboardInterrupt:
        if step > last_saved:
            save_checkpoint(accelerator, output_dir, step, args.checkpoints_total_limit)
            print(f"\ninterrupted: saved step {step}; resume with --resume_from_checkpoint latest", file=sys.stderr)
        raise
    finally:
        progress.close()

    if accelerator.is_main_process:
        if ema is not None:
            ema.copy_to(unwrapped.parameters())
        final = save_final_model(unwrapped, noise_scheduler, args, manifest, output_dir, latent_shape)
        print(f"saved {final}; training took {time.perf_counter() - started:.0f} s")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    run(main, parse_args())
