"""Stage 1: train a diffusers AutoencoderKL on the spectrograms.

    python training/train_vae.py --data_dir data/simulated --output_dir outputs/vae --preset quick
    python training/train_vae.py ... --resume_from_checkpoint latest   # continue an interrupted run

Loss = pixel (L1 or MSE, mean per pixel) + kl_weight * KL (mean per latent element, so
the weight means the same at every resolution) + perceptual_weight * LPIPS +
freq_weight * L1 between log-magnitude spectra (orthonormal FFT, so the DC term does
not dominate), and with --disc_weight > 0 a patch-discriminator hinge GAN from step
--disc_start on, adaptively weighted (Esser et al., 2021). Learning rate: linear warmup
then cosine, stepped per optimiser step.
The model is always called through the accelerate-prepared module, so autocast and DDP
apply (DESIGN.md, pitfall 6). At the end the latent scale is measured on the train split
and stored in final_model/config.json as `scaling_factor` (never copied from Stable
Diffusion, pitfall 5).
"""

import argparse
import json
import sys
import time
from pathlib import Path

if not __package__:  # run as `python training/train_vae.py`: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from utils.cli import UsageError, run
from utils.data_loader import MANIFEST_NAME, DatasetManifest, SpectrogramDataset, build_manifest, check_data_dir
from utils.files import atomic_folder, atomic_path
from utils.image_grid import labelled_grid, to_pil
from utils.metrics import LpipsUnavailable, load_lpips, psnr, ssim
from utils.presets import PRESET_NAMES, resolve_preset
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
from utils.vae import reconstruct

LATENT_STATS_NAME = "latent_stats.json"


class AutoencoderWithPosterior(torch.nn.Module):
    """One forward pass that returns the reconstruction and the posterior, so that DDP
    and autocast see the whole encoder-decoder call."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, pixel_values):
        posterior = self.vae.encode(pixel_values).latent_dist
        latents = posterior.sample()  # (B, C, R/f, R/f)
        return self.vae.decode(latents).sample, posterior


def build_vae(args):
    from diffusers import AutoencoderKL

    levels = len(args.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(args.block_out_channels),
        layers_per_block=args.layers_per_block,
        latent_channels=args.latent_channels,
        norm_num_groups=args.norm_num_groups,
        sample_size=args.resolution,
    )


def log_spectrum(images):
    """log(1 + |FFT|) per channel, orthonormal so its scale is resolution-independent."""
    return torch.log1p(torch.abs(torch.fft.rfft2(images.float(), norm="ortho")))


def vae_losses(reconstructions, originals, posterior, args, perceptual):
    """Each term of the stage-1 loss and their weighted sum."""
    reconstructions, originals = reconstructions.float(), originals.float()
    if args.pixel_loss == "l1":
        pixel = F.l1_loss(reconstructions, originals)
    else:
        pixel = F.mse_loss(reconstructions, originals)
    latent_elements = posterior.mean[0].numel()
    kl = posterior.kl().mean() / latent_elements
    terms = {"pixel": pixel, "kl": kl}
    total = pixel + args.kl_weight * kl
    if args.freq_weight > 0:
        terms["freq"] = F.l1_loss(log_spectrum(reconstructions), log_spectrum(originals))
        total = total + args.freq_weight * terms["freq"]
    if perceptual is not None:
        terms["lpips"] = perceptual(reconstructions, originals).mean()
        total = total + args.perceptual_weight * terms["lpips"]
    terms["loss"] = total
    return terms


class PatchDiscriminator(torch.nn.Module):
    """PatchGAN (pix2pix; the latent-diffusion autoencoders' adversarial loss): one real/
    fake logit per overlapping patch, so it judges texture rather than the whole image.
    GroupNorm instead of BatchNorm: no statistics to synchronise across processes."""

    def __init__(self, channels=64, layers=3):
        super().__init__()
        modules = [torch.nn.Conv2d(3, channels, 4, stride=2, padding=1), torch.nn.LeakyReLU(0.2)]
        width = channels
        for level in range(1, layers + 1):
            out = channels * min(2**level, 8)
            stride = 2 if level < layers else 1
            modules += [
                torch.nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=False),
                torch.nn.GroupNorm(min(32, out // 4), out),
                torch.nn.LeakyReLU(0.2),
            ]
            width = out
        modules.append(torch.nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.layers = torch.nn.Sequential(*modules)

    def forward(self, images):
        return self.layers(images)  # (B, 1, h, w) logits


def discriminator_hinge_loss(logits_real, logits_fake):
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def adversarial_terms(discriminator, reconstructions, reconstruction_loss, last_layer, disc_weight):
    """Generator side of the hinge GAN with the adaptive weight of Esser et al. (2021):
    the adversarial gradient at the decoder's last layer is scaled to the reconstruction
    gradient's norm, times disc_weight, so the weight means the same at any loss scale.
    `discriminator` is the unwrapped module; its parameters are frozen here so that only
    the decoder receives this gradient."""
    discriminator.requires_grad_(False)
    generator_loss = -discriminator(reconstructions).float().mean()
    discriminator.requires_grad_(True)
    grad_reconstruction = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)[0]
    grad_adversarial = torch.autograd.grad(generator_loss, last_layer, retain_graph=True)[0]
    weight = (grad_reconstruction.norm() / (grad_adversarial.norm() + 1e-4)).clamp(0, 1e4).detach() * disc_weight
    return {"g_adv": generator_loss, "adv_weight": weight}


def time_shift(pixel_values):
    """Augmentation: roll each spectrogram along time by a random amount (a walk
    recorded a little earlier or later); Doppler is never flipped."""
    shifts = torch.randint(0, pixel_values.shape[-1], (pixel_values.shape[0],)).tolist()
    return torch.stack([torch.roll(image, shift, dims=-1) for image, shift in zip(pixel_values, shifts)])


@torch.no_grad()
def validate(accelerator, vae, dataset, args, step, metrics, output_dir):
    """PSNR and SSIM on the val split, a grid of originals over reconstructions, curves."""
    vae.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False)
    scores_psnr, scores_ssim, shown = [], [], []
    for batch in loader:
        originals = batch["pixel_values"].to(accelerator.device)
        with accelerator.autocast():
            reconstructions = reconstruct(vae, originals).float()
        scores_psnr.append(psnr(reconstructions, originals).cpu())
        scores_ssim.append(ssim(reconstructions, originals).cpu())
        if len(shown) < args.num_validation_images:
            shown.extend(zip(originals.cpu(), reconstructions.cpu()))
    vae.train()
    val_psnr, val_ssim = torch.cat(scores_psnr).mean().item(), torch.cat(scores_ssim).mean().item()
    metrics.log(step, val_psnr=val_psnr, val_ssim=val_ssim)
    shown = shown[: args.num_validation_images]
    rows = [[to_pil(pair[0]) for pair in shown], [to_pil(pair[1]) for pair in shown]]
    with atomic_path(Path(output_dir) / "samples" / f"step-{step:06d}.png") as tmp:
        labelled_grid(rows, ["original", "reconstruction"]).save(tmp, format="PNG")
    plot_curves(metrics.read(), Path(output_dir) / "logs" / "curves.png", ["loss", "pixel", "lpips", "freq", "g_adv", "d_loss", "val_psnr", "val_ssim"])
    return val_psnr, val_ssim


@torch.no_grad()
def measure_latent_stats(accelerator, vae, dataset, args):
    """Mean and std of posterior samples over (a seeded subset of) the train split.
    The diffusion stage multiplies latents by scaling_factor = 1 / std."""
    vae.eval()
    generator = torch.Generator().manual_seed(args.seed)
    count = min(len(dataset), args.latent_stats_images)
    indices = torch.randperm(len(dataset), generator=generator)[:count].tolist()
    subset = torch.utils.data.Subset(dataset, indices)
    loader = torch.utils.data.DataLoader(subset, batch_size=args.batch_size, shuffle=False)
    latents = []
    for batch in tqdm(loader, desc="latent statistics", disable=not accelerator.is_main_process, leave=False):
        with accelerator.autocast():
            posterior = vae.encode(batch["pixel_values"].to(accelerator.device)).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator).to(posterior.mean)
        latents.append((posterior.mean + posterior.std * noise).float().cpu())
    latents = torch.cat(latents)  # (N, C, h, w)
    per_channel = latents.transpose(0, 1).flatten(1)
    return {
        "num_images": count,
        "mean": latents.mean().item(),
        "std": latents.std().item(),
        "channel_mean": per_channel.mean(1).tolist(),
        "channel_std": per_channel.std(1).tolist(),
        "scaling_factor": 1.0 / latents.std().item(),
        "latent_shape": list(latents.shape[1:]),
    }


def save_final_model(vae, manifest, stats, output_dir):
    """final_model/: save_pretrained (config + safetensors) with the measured scaling
    factor, latent_stats.json and the dataset manifest, renamed into place when complete."""
    final = Path(output_dir) / "final_model"
    vae.register_to_config(scaling_factor=stats["scaling_factor"])
    with atomic_folder(final) as partial:
        vae.save_pretrained(partial, safe_serialization=True)
        write_json(partial / LATENT_STATS_NAME, stats)
        manifest.save(partial / MANIFEST_NAME)
    return final


def check_architecture(args):
    factor = 2 ** (len(args.block_out_channels) - 1)
    if args.resolution < 8 or args.resolution % factor:
        raise UsageError(
            f"--resolution {args.resolution} must be a multiple of {factor}: the encoder halves it "
            f"{len(args.block_out_channels) - 1} times (--block_out_channels {' '.join(map(str, args.block_out_channels))})"
        )
    bad = [c for c in args.block_out_channels if c % args.norm_num_groups]
    if bad:
        raise UsageError(f"--block_out_channels {bad} must be multiples of --norm_num_groups {args.norm_num_groups}")
    for name in ("batch_size", "gradient_accumulation_steps", "layers_per_block", "latent_channels"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1")
    if not (args.max_train_steps or args.num_epochs):
        raise UsageError("give --max_train_steps or --num_epochs")


def resolve_perceptual(args):
    """The LPIPS model when the loss uses it. 'auto' (the presets' choice) means 1.0 when
    the backbone weights load and 0 otherwise, said in the banner and config.json; an
    explicit weight > 0 without weights stops the run: the loss never changes silently."""
    if args.perceptual_weight == "auto":
        try:
            model = load_lpips()
        except LpipsUnavailable as error:
            args.perceptual_weight = 0.0
            args.perceptual_note = f"perceptual loss off: {error}"
            return None
        args.perceptual_weight = 1.0
        args.perceptual_note = "perceptual loss on (LPIPS, AlexNet backbone found)"
        return model
    try:
        args.perceptual_weight = float(args.perceptual_weight)
    except ValueError:
        raise UsageError(f"--perceptual_weight must be a number or 'auto', got {args.perceptual_weight!r}") from None
    if args.perceptual_weight <= 0:
        args.perceptual_note = "perceptual loss off (--perceptual_weight 0)"
        return None
    try:
        model = load_lpips()
    except LpipsUnavailable as error:
        raise UsageError(str(error)) from None
    args.perceptual_note = f"perceptual loss on (weight {args.perceptual_weight})"
    return model


def load_or_build_manifest(args, output_dir):
    """The run folder's manifest when resuming or re-running, else a new one."""
    stored = Path(output_dir) / MANIFEST_NAME
    if stored.exists():
        manifest = DatasetManifest.load(stored)
        manifest.check_users_match(args.data_dir)
        return manifest
    return build_manifest(args.data_dir, args.val_fraction, args.test_fraction, args.seed)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Stage 1: train an AutoencoderKL on spectrograms (see the module docstring for the loss).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data_dir", required=True, help="dataset folder: one subfolder of images per user")
    p.add_argument("--output_dir", required=True, help="run folder (config, logs, samples, checkpoints, final_model)")
    p.add_argument("--preset", choices=PRESET_NAMES, default="quick", help="fills every size/schedule flag left unset")
    p.add_argument("--dry_run", action="store_true", help="print the resolved configuration and exit")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the initialisation and the data order")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--val_fraction", type=float, default=0.1, help="share of each user's images for validation")
    p.add_argument("--test_fraction", type=float, default=0.2, help="share of each user's images held out for testing")
    model = p.add_argument_group("model (preset)")
    model.add_argument("--resolution", type=int, help="image side; a multiple of 2^(levels-1)")
    model.add_argument("--block_out_channels", type=int, nargs="+", help="channels per level, e.g. 128 256 512 512")
    model.add_argument("--layers_per_block", type=int)
    model.add_argument("--latent_channels", type=int)
    model.add_argument("--norm_num_groups", type=int, help="GroupNorm groups; divides every channel count")
    loss = p.add_argument_group("loss (preset)")
    loss.add_argument("--pixel_loss", choices=["l1", "mse"])
    loss.add_argument("--kl_weight", type=float, help="weight of the KL term (mean per latent element)")
    loss.add_argument("--perceptual_weight", help="weight of LPIPS, or 'auto': 1 when its backbone weights are present, else 0")
    loss.add_argument("--freq_weight", type=float, help="weight of the log-magnitude spectrum L1 term")
    loss.add_argument("--disc_weight", type=float, help="patch-discriminator (hinge GAN) weight, adaptive; 0 = off")
    loss.add_argument("--disc_start", type=int, help="optimiser step at which the discriminator starts")
    loss.add_argument("--disc_channels", type=int, help="discriminator width")
    loss.add_argument("--disc_layers", type=int, help="discriminator depth (receptive field 34 px at 2, 70 px at 3)")
    opt = p.add_argument_group("optimisation (preset)")
    opt.add_argument("--batch_size", type=int, help="images per process per step")
    opt.add_argument("--num_epochs", type=int, help="epochs, when --max_train_steps is not given")
    opt.add_argument("--max_train_steps", type=int, help="optimiser steps; overrides --num_epochs")
    opt.add_argument("--learning_rate", type=float)
    opt.add_argument("--warmup_steps", type=int, help="linear warmup, in optimiser steps")
    opt.add_argument("--weight_decay", type=float)
    opt.add_argument("--max_grad_norm", type=float, help="gradient clipping norm")
    opt.add_argument("--gradient_accumulation_steps", type=int)
    opt.add_argument("--mixed_precision", choices=["no", "fp16", "bf16", "auto"],
                     help="auto: bf16 where the CPU or GPU computes it natively, else fp16 on a GPU, no on a CPU")
    opt.add_argument("--use_augmentation", action="store_true", help="random circular time shifts (never Doppler flips)")
    opt.add_argument("--num_workers", type=int, default=0, help="data loading processes")
    run_group = p.add_argument_group("run folder")
    run_group.add_argument("--checkpointing_steps", type=int, help="save the full training state every N steps")
    run_group.add_argument("--checkpoints_total_limit", type=int, help="keep the newest N checkpoints")
    run_group.add_argument("--resume_from_checkpoint", help="'latest' or a checkpoint folder")
    run_group.add_argument("--validation_steps", type=int, help="validate every N steps")
    run_group.add_argument("--num_validation_images", type=int, help="images in each validation grid")
    run_group.add_argument("--latent_stats_images", type=int, help="train images used to measure the latent scale")
    run_group.add_argument("--report_to", choices=["none", "tensorboard", "wandb"], default="none")
    return p.parse_args(argv)


def main(args):
    decided = resolve_preset(args, "vae")
    check_architecture(args)
    check_data_dir(args.data_dir)
    output_dir = Path(args.output_dir)
    if args.dry_run:
        print(json.dumps({**vars(args), "preset_filled": decided}, indent=2))
        return 0
    resume_from = resume_point(output_dir, args.resume_from_checkpoint)
    perceptual = resolve_perceptual(args)

    accelerator = make_accelerator(args, output_dir)
    torch.manual_seed(args.seed)
    manifest = load_or_build_manifest(args, output_dir)
    train_set = SpectrogramDataset(args.data_dir, manifest, "train", args.resolution)
    val_set = SpectrogramDataset(args.data_dir, manifest, "val", args.resolution)
    if len(train_set) < args.batch_size or len(val_set) == 0:
        raise UsageError(f"{len(train_set)} train / {len(val_set)} val images: too few for --batch_size {args.batch_size}")
    loader = accelerator.prepare(train_loader(train_set, args.batch_size, args.seed, args.num_workers))
    # Per process: each step takes one batch on every process (the effective batch is batch x processes).
    max_steps, steps_per_epoch = total_steps(args, len(loader))

    vae = build_vae(args)
    model = AutoencoderWithPosterior(vae)
    optimizer = adamw(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    from diffusers.optimization import get_scheduler

    # The prepared scheduler advances once per process per optimiser step.
    lr_scheduler = get_scheduler(
        "cosine",
        optimizer,
        num_warmup_steps=args.warmup_steps * accelerator.num_processes,
        num_training_steps=max_steps * accelerator.num_processes,
    )
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    discriminator = None
    if args.disc_weight > 0:
        discriminator = PatchDiscriminator(args.disc_channels, args.disc_layers)
        disc_optimizer = adamw(discriminator.parameters(), lr=args.learning_rate, betas=(0.5, 0.9))
        discriminator, disc_optimizer = accelerator.prepare(discriminator, disc_optimizer)
    if perceptual is not None:
        perceptual = perceptual.to(accelerator.device)

    unwrapped = accelerator.unwrap_model(model).vae
    step = 0
    if resume_from is not None:
        step = load_checkpoint(accelerator, resume_from)["step"]
    metrics = MetricsLog(accelerator, output_dir)
    metrics.truncate_after(step)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        manifest.save(output_dir / MANIFEST_NAME)
        config = write_run_config(accelerator, output_dir, args, max_steps, "train_vae", preset_filled=decided)
        parameters = sum(p.numel() for p in vae.parameters())
        print(
            f"train_vae: preset {args.preset}, {args.resolution}x{args.resolution} -> "
            f"{args.resolution // 2 ** (len(args.block_out_channels) - 1)}^2 x {args.latent_channels} latents, "
            f"{parameters / 1e6:.2f} M parameters, {len(train_set)} train / {len(val_set)} val images, "
            f"{manifest.num_users} users\n"
            f"  steps {step} -> {max_steps}, effective batch {config['effective_batch_size']} "
            f"({args.batch_size} x {args.gradient_accumulation_steps} accumulation x {accelerator.num_processes} processes), "
            f"lr {args.learning_rate} warmup {args.warmup_steps} cosine, {accelerator.device}, precision {args.mixed_precision}\n"
            f"  loss {args.pixel_loss} + {args.kl_weight} KL + {args.freq_weight} freq + {args.perceptual_weight} LPIPS; "
            f"{args.perceptual_note}"
            + (f"; patch discriminator from step {args.disc_start}, adaptive weight x {args.disc_weight}" if discriminator else "")
            + (f"\n  resumed from {resume_from}" if resume_from else "")
        )

    last_saved = step
    progress = tqdm(total=max_steps, initial=step, desc="vae", disable=not accelerator.is_main_process)
    started = time.perf_counter()
    try:
        while step < max_steps:
            epoch, done_in_epoch = divmod(step, steps_per_epoch)
            batches = epoch_batches(accelerator, loader, epoch, done_in_epoch * args.gradient_accumulation_steps)
            for batch in batches:
                pixel_values = batch["pixel_values"]
                if args.use_augmentation:
                    pixel_values = time_shift(pixel_values)
                adversarial = discriminator is not None and step >= args.disc_start
                with accelerator.accumulate(model, *([discriminator] if discriminator is not None else [])):
                    reconstructions, posterior = model(pixel_values)
                    terms = vae_losses(reconstructions, pixel_values, posterior, args, perceptual)
                    if adversarial:
                        terms.update(adversarial_terms(
                            accelerator.unwrap_model(discriminator), reconstructions, terms["loss"],
                            unwrapped.decoder.conv_out.weight, args.disc_weight,
                        ))
                        terms["loss"] = terms["loss"] + terms["adv_weight"] * terms["g_adv"]
                    check_finite(terms["loss"], step, output_dir)
                    accelerator.backward(terms["loss"])
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    if adversarial:
                        terms["d_loss"] = discriminator_hinge_loss(
                            discriminator(pixel_values), discriminator(reconstructions.detach())
                        )
                        accelerator.backward(terms["d_loss"])
                        if accelerator.sync_gradients:
                            accelerator.clip_grad_norm_(discriminator.parameters(), args.max_grad_norm)
                        disc_optimizer.step()
                        disc_optimizer.zero_grad(set_to_none=True)
                if not accelerator.sync_gradients:
                    continue
                step += 1
                values = {k: v.item() for k, v in terms.items()}
                metrics.log(step, lr=lr_scheduler.get_last_lr()[0], **values)
                progress.update(1)
                progress.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}")
                if step % args.checkpointing_steps == 0 or step == max_steps:
                    save_checkpoint(accelerator, output_dir, step, args.checkpoints_total_limit)
                    last_saved = step
                if accelerator.is_main_process and (step % args.validation_steps == 0 or step == max_steps):
                    val_psnr, val_ssim = validate(accelerator, unwrapped, val_set, args, step, metrics, output_dir)
                    progress.write(f"step {step}: val PSNR {val_psnr:.2f} dB, SSIM {val_ssim:.4f}")
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
        stats = measure_latent_stats(accelerator, unwrapped, train_set, args)
        final = save_final_model(unwrapped, manifest, stats, output_dir)
        seconds = time.perf_counter() - started
        print(
            f"saved {final} (latent std {stats['std']:.4f} -> scaling_factor {stats['scaling_factor']:.4f}); "
            f"training took {seconds:.0f} s"
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    run(main, parse_args())
