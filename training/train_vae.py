"""Stage 1: train a diffusers AutoencoderKL on the spectrograms.

    python training/train_vae.py --data_dir data/simulated --output_dir outputs/vae --preset quick
    python training/train_vae.py ... --manifest outputs/pipeline/dataset_manifest.json   # a stored split
    python training/train_vae.py ... --resume_from_checkpoint latest   # continue an interrupted run

Loss = pixel (L1 or MSE, mean per pixel) + kl_weight * KL (mean per latent element, so
the weight means the same at every resolution) + perceptual_weight * LPIPS +
freq_weight * L1 between log-magnitude spectra (orthonormal FFT, so the DC term does
not dominate), and with --disc_weight > 0 a patch-discriminator hinge GAN from step
--disc_start on, adaptively weighted (Esser et al., 2021). Learning rate: linear warmup
then cosine, stepped per optimiser step. The model, losses and step are in utils/vae.py
and utils/losses.py; at the end the latent scale is measured on the train split and
stored in final_model/config.json as `scaling_factor`.
"""

import argparse
import json
import sys
import time
from pathlib import Path

if not __package__:  # run as `python training/train_vae.py`: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from utils.cli import HelpFormatter, UsageError, run
from utils.data_loader import MANIFEST_NAME, DatasetManifest, SpectrogramDataset, add_split_arguments, check_data_dir, \
    stage_manifest
from utils.files import atomic_path
from utils.image_grid import labelled_grid, to_pil
from utils.metrics import psnr, ssim
from utils.presets import PRESET_NAMES
from utils.training import add_training_arguments, make_accelerator, resume_point, start_run, total_steps, train_loader, train_loop, \
    write_run_config
from utils.vae import ARCHITECTURE, build_vae_training, measure_latent_stats, reconstruct, resolve_vae_config, save_vae

CURVES = ["loss", "pixel", "lpips", "freq", "g_adv", "d_loss", "val_psnr", "val_ssim"]


@torch.no_grad()
def validate(accelerator, vae, dataset, config, step, metrics, output_dir):
    """PSNR and SSIM on the val split and a grid of originals over reconstructions; returns a line to print."""
    vae.eval()
    # Its own generator: a loader's iterator draws a seed from the global RNG otherwise, and only
    # the main process validates, so its training noise would no longer match a resumed run's.
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, shuffle=False, generator=torch.Generator())
    scores_psnr, scores_ssim, shown = [], [], []
    for batch in loader:
        originals = batch["pixel_values"].to(accelerator.device)
        with accelerator.autocast():
            reconstructions = reconstruct(vae, originals).float()
        scores_psnr.append(psnr(reconstructions, originals).cpu())
        scores_ssim.append(ssim(reconstructions, originals).cpu())
        if len(shown) < config.num_validation_images:
            shown.extend(zip(originals.cpu(), reconstructions.cpu()))
    vae.train()
    val_psnr, val_ssim = torch.cat(scores_psnr).mean().item(), torch.cat(scores_ssim).mean().item()
    metrics.log(step, val_psnr=val_psnr, val_ssim=val_ssim)
    shown = shown[: config.num_validation_images]
    rows = [[to_pil(pair[0]) for pair in shown], [to_pil(pair[1]) for pair in shown]]
    with atomic_path(Path(output_dir) / "samples" / f"step-{step:06d}.png") as tmp:
        labelled_grid(rows, ["original", "reconstruction"]).save(tmp, format="PNG")
    return f"step {step}: val PSNR {val_psnr:.2f} dB, SSIM {val_ssim:.4f}"


def run_manifest(args, data_dir, output_dir):
    """The split of this run: --manifest or a new one, and the same as the run folder's on a re-run."""
    manifest = stage_manifest(args, data_dir)
    stored = Path(output_dir) / MANIFEST_NAME
    if stored.exists():
        DatasetManifest.load(stored).require_same_split(manifest, f"the run folder {output_dir}", "this command")
    return manifest


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Stage 1: train an AutoencoderKL on spectrograms (see the module docstring for the loss).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--data_dir", required=True, help="dataset folder: one subfolder of images per user")
    p.add_argument("--output_dir", required=True, help="run folder (config, logs, samples, checkpoints, final_model)")
    p.add_argument("--preset", choices=PRESET_NAMES, default="quick", help="fills every size/schedule flag left unset")
    p.add_argument("--dry_run", action="store_true", help="print the resolved configuration and exit")
    p.add_argument("--seed", type=int, help="seed of the initialisation and the data order (not the split; default 0)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    add_split_arguments(p)
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
    opt, run_group = add_training_arguments(p, "images")
    opt.add_argument("--num_workers", type=int, help="data loading processes (default 0)")
    run_group.add_argument("--num_validation_images", type=int, help="images in each validation grid")
    run_group.add_argument("--latent_stats_images", type=int, help="train images used to measure the latent scale")
    return p.parse_args(argv)


def main(args):
    config = resolve_vae_config(vars(args))
    data_dir = check_data_dir(config.data_dir)
    output_dir = Path(config.output_dir)
    if config.dry_run:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    resume_from = resume_point(output_dir, config.resume_from_checkpoint, config, ARCHITECTURE)
    manifest = run_manifest(args, data_dir, output_dir)

    accelerator = make_accelerator(config.device, config.mixed_precision, config.gradient_accumulation_steps,
                                   config.report_to, output_dir)
    torch.manual_seed(config.seed)
    train_set = SpectrogramDataset(data_dir, manifest, "train", config.resolution)
    val_set = SpectrogramDataset(data_dir, manifest, "val", config.resolution)
    if len(train_set) < config.batch_size or len(val_set) == 0:
        raise UsageError(f"{len(train_set)} train / {len(val_set)} val images: too few for --batch_size {config.batch_size}")
    loader = accelerator.prepare(train_loader(train_set, config.batch_size, config.seed, config.num_workers))
    # Per process: each step takes one batch on every process (the effective batch is batch x processes).
    max_steps, steps_per_epoch = total_steps(config.max_train_steps, config.num_epochs, len(loader),
                                             config.gradient_accumulation_steps)
    training = build_vae_training(config, accelerator, max_steps)
    step, metrics = start_run(accelerator, output_dir, resume_from, config.seed)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        manifest.save(output_dir / MANIFEST_NAME)
        written = write_run_config(accelerator, output_dir, config, max_steps, "train_vae")
        parameters = sum(p.numel() for p in training.vae.parameters())
        print(
            f"train_vae: preset {config.preset}, {config.resolution}x{config.resolution} -> "
            f"{config.latent_shape[1]}^2 x {config.latent_channels} latents, {parameters / 1e6:.2f} M parameters, "
            f"{len(train_set)} train / {len(val_set)} val images, {manifest.num_users} users\n"
            f"  steps {step} -> {max_steps}, effective batch {written['effective_batch_size']} "
            f"({config.batch_size} x {config.gradient_accumulation_steps} accumulation x {accelerator.num_processes} "
            f"processes), lr {config.learning_rate} warmup {config.warmup_steps} cosine, {accelerator.device}, "
            f"precision {config.mixed_precision}\n"
            f"  loss {config.pixel_loss} + {config.kl_weight} KL + {config.freq_weight} freq + {config.perceptual_weight} "
            f"LPIPS; {config.perceptual_note}"
            + (f"; patch discriminator from step {config.disc_start}, adaptive weight x {config.disc_weight}"
               if config.disc_weight > 0 else "")
            + (f"\n  resumed from {resume_from}" if resume_from else "")
        )

    started = time.perf_counter()
    train_loop(
        accelerator, loader, training.step, modules=training.modules, lr_scheduler=training.lr_scheduler,
        metrics=metrics, output_dir=output_dir, start_step=step, max_steps=max_steps, steps_per_epoch=steps_per_epoch,
        gradient_accumulation_steps=config.gradient_accumulation_steps, checkpointing_steps=config.checkpointing_steps,
        checkpoints_total_limit=config.checkpoints_total_limit, validation_steps=config.validation_steps,
        validate=lambda at: validate(accelerator, training.vae, val_set, config, at, metrics, output_dir),
        curve_keys=CURVES, desc="vae",
    )
    if accelerator.is_main_process:
        stats = measure_latent_stats(accelerator, training.vae, train_set, config.latent_stats_images,
                                     config.batch_size, config.seed)
        final = save_vae(training.vae, manifest, stats, output_dir / "final_model")
        print(f"saved {final} (latent std {stats['std']:.4f} -> scaling_factor {stats['scaling_factor']:.4f}); "
              f"training took {time.perf_counter() - started:.0f} s")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    run(main, parse_args())
