"""Stage 2: a latent diffusion model conditioned on the user.

    python training/train_diffusion.py --data_dir data/simulated \\
        --vae_path outputs/vae/final_model --output_dir outputs/diffusion --preset quick
    python training/train_diffusion.py ... --resume_from_checkpoint latest

Users and the split come from the manifest stored with the VAE (a --manifest, when
given, must be the same), so labels mean the same in every stage and the test split
stays unseen. The train split is encoded once into a latent cache; the condition
encoder maps a user index to a few cross-attention tokens, and with --condition_dropout
a sample's index becomes the null token `num_users` that classifier-free guidance uses.
Loss: MSE on epsilon or v, optionally Min-SNR weighted (Hang et al., 2023); DDPM
schedule with Stable Diffusion's scaled-linear betas; EMA of the UNet and the encoder.
The model, cache and step are in utils/diffusion.py.
"""

import argparse
import json
import sys
import time
from pathlib import Path

if not __package__:  # run as `python training/train_diffusion.py`: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from tqdm.auto import tqdm

from utils.cli import HelpFormatter, UsageError, run
from utils.data_loader import MANIFEST_NAME, SpectrogramDataset, add_split_arguments, check_data_dir
from utils.diffusion import UNET_ARCHITECTURE, LatentDataset, build_diffusion_training, heldout_loss, \
    load_or_build_cache, resolve_diffusion_config
from utils.files import atomic_path
from utils.image_grid import labelled_grid, to_pil
from utils.pipeline import save_generator
from utils.presets import PRESET_NAMES
from utils.sampling import decode_latents, make_sampler, sample_latents
from utils.training import add_training_arguments, make_accelerator, resume_point, start_run, total_steps, train_loader, train_loop, \
    user_weights, write_run_config
from utils.vae import trained_vae


# What the checkpoint's tensors depend on: a resumed run must have the same.
RESUMABLE_ARCHITECTURE = (*UNET_ARCHITECTURE, "latent_shape", "class_embedding", "num_condition_tokens", "use_ema")
# Runs from before an option existed were trained the one way there was.
UNRECORDED_ARCHITECTURE = {"scale_shift": False}


def validation_users(manifest, count):
    """`count` users spread evenly over the label map (all when count >= num_users)."""
    count = min(count, manifest.num_users)
    return [manifest.users[round(i * (manifest.num_users - 1) / max(1, count - 1))] for i in range(count)]


@torch.no_grad()
def validate(accelerator, training, vae, config, manifest, step, output_dir):
    """A grid with the EMA weights: one row per validation user (name in the margin), a
    real train image of that user first, then one generated image per seed."""
    training.swap_in_ema()
    denoiser = training.denoiser.eval()
    users = validation_users(manifest, config.validation_users)
    seeds = list(range(config.validation_seeds))
    indices = torch.tensor([manifest.label_map[u] for u in users for _ in seeds], device=accelerator.device)
    sampler = make_sampler(training.noise_scheduler.config, "dpmsolver")
    with accelerator.autocast():
        latents = sample_latents(denoiser.unet, denoiser.condition_encoder, sampler, indices, seeds * len(users),
                                 config.latent_shape, config.guidance_scale, config.num_inference_steps)
        images = decode_latents(vae, latents, vae.config.scaling_factor).cpu()
    denoiser.train()
    training.swap_out_ema()
    real = SpectrogramDataset(config.data_dir, manifest, "train", config.resolution)
    first_of_user = {}
    for position, (_, label) in enumerate(real.samples):
        first_of_user.setdefault(label, position)
    rows = []
    for row, user in enumerate(users):
        generated = [to_pil(image) for image in images[row * len(seeds):(row + 1) * len(seeds)]]
        rows.append([to_pil(real[first_of_user[manifest.label_map[user]]]["pixel_values"])] + generated)
    with atomic_path(Path(output_dir) / "samples" / f"step-{step:06d}.png") as tmp:
        labelled_grid(rows, users, cell_size=max(config.resolution, 128)).save(tmp, format="PNG")
    return f"step {step}: validation grid samples/step-{step:06d}.png"


def best_so_far(losses):
    """(index of the lowest of `losses`, how many came after it); (None, 0) for none."""
    if not losses:
        return None, 0
    best = min(range(len(losses)), key=losses.__getitem__)
    return best, len(losses) - 1 - best


class HeldoutSelection:
    """The held-out loss of the EMA weights every `heldout_steps`. The weights of its lowest
    value are kept (best/denoiser.safetensors) and become final_model; with a patience, the
    run stops once that many measurements in a row have not improved on it. The state is
    the metrics log itself, so a resumed run picks it up."""

    def __init__(self, accelerator, training, config, cache, output_dir, records):
        self.accelerator, self.training, self.config, self.cache = accelerator, training, config, cache
        self.path = Path(output_dir) / "best" / "denoiser.safetensors"
        logged = [(r["step"], r["heldout_loss"]) for r in records if "heldout_loss" in r]
        best, self.since_best = best_so_far([loss for _, loss in logged])
        self.best_step, self.best_loss = logged[best] if logged else (None, float("inf"))

    @torch.no_grad()
    def __call__(self, step):
        from safetensors.torch import save_file

        self.training.swap_in_ema()
        denoiser = self.training.denoiser.eval()
        with self.accelerator.autocast():
            loss = heldout_loss(denoiser, self.training.noise_scheduler, self.cache, self.config,
                                self.accelerator.device)
        if loss < self.best_loss:
            self.best_step, self.best_loss, self.since_best = step, loss, 0
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.path) as tmp:
                save_file({k: v.detach().cpu().contiguous() for k, v in denoiser.state_dict().items()}, str(tmp))
        else:
            self.since_best += 1
        denoiser.train()
        self.training.swap_out_ema()
        patience = self.config.heldout_patience
        stop = bool(patience) and self.since_best >= patience
        if stop:
            # Memorising raises the held-out loss up to about twofold (docs/experiments.md); a diverged run
            # (too high a learning rate) multiplies it tenfold, with no non-finite value for the loop's guard.
            diverged = (f"; now {loss:.4f}, over four times that: the training diverged, try a lower --learning_rate"
                        if loss > 4 * self.best_loss else "")
            tqdm.write(f"step {step}: the held-out loss has not improved for {self.since_best} measurements since "
                       f"step {self.best_step} ({self.best_loss:.4f}){diverged}: stopping")
        return {"heldout_loss": loss}, stop

    def load_best(self, last_step):
        """Put the best measured weights into the denoiser; returns the model card's line on them."""
        from safetensors.torch import load_file

        if self.best_step is None:
            return None
        if self.best_step != last_step:
            self.training.denoiser.load_state_dict(load_file(str(self.path)))
        return (f"the {'EMA ' if self.config.use_ema else ''}weights of step {self.best_step}, the lowest held-out "
                f"(val split) loss, {self.best_loss:.4f}, of {last_step} steps trained")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Stage 2: train a user-conditioned latent diffusion model (see the module docstring).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--data_dir", required=True, help="dataset folder: one subfolder of images per user")
    p.add_argument("--vae_path", required=True, help="stage-1 final_model folder (its manifest fixes users and split)")
    p.add_argument("--output_dir", required=True, help="run folder (config, latent cache, logs, samples, checkpoints, final_model)")
    p.add_argument("--preset", choices=PRESET_NAMES, default="quick", help="fills every size/schedule flag left unset")
    p.add_argument("--dry_run", action="store_true", help="print the resolved configuration and exit")
    p.add_argument("--seed", type=int, help="seed of the initialisation, the data order and the noise (default 0)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--resolution", type=int, help="image side; must equal the VAE's (default: the VAE's)")
    add_split_arguments(p, new_split=False)
    model = p.add_argument_group("model (preset)")
    model.add_argument("--block_out_channels", type=int, nargs="+", help="UNet channels per level")
    model.add_argument("--layers_per_block", type=int)
    model.add_argument("--attention_levels", type=int,
                       help="UNet levels with attention, counted from the lowest resolution (the mid-block always "
                            "has it)")
    model.add_argument("--attention_head_dim", type=int, help="attention heads per cross-attention block")
    model.add_argument("--norm_num_groups", type=int, help="GroupNorm groups; divides every channel count")
    model.add_argument("--cross_attention_dim", type=int, help="width of the condition tokens")
    model.add_argument("--num_condition_tokens", type=int, help="tokens per user condition")
    model.add_argument("--class_embedding", action=argparse.BooleanOptionalAction, default=None,
                       help="the user also through the UNet's timestep embedding (every ResNet block), beside "
                            "cross-attention")
    model.add_argument("--scale_shift", action=argparse.BooleanOptionalAction, default=None,
                       help="the timestep (and user) embedding scales and shifts each ResNet block's normalised "
                            "features (FiLM) instead of only being added to them")
    diffusion = p.add_argument_group("diffusion (preset)")
    diffusion.add_argument("--balance_users", action=argparse.BooleanOptionalAction, default=None,
                           help="draw every user equally often (users with unequal image counts); default off: every "
                                "image once per epoch")
    diffusion.add_argument("--num_train_timesteps", type=int)
    diffusion.add_argument("--prediction_type", choices=["epsilon", "v_prediction"])
    diffusion.add_argument("--snr_gamma", type=float, help="Min-SNR weighting gamma (e.g. 5); 0 = plain MSE")
    diffusion.add_argument("--condition_dropout", type=float, help="share of samples trained with the null token")
    opt, run_group = add_training_arguments(p, "latents")
    opt.add_argument("--use_ema", action=argparse.BooleanOptionalAction, default=None, help="keep an EMA of the weights")
    opt.add_argument("--ema_decay", type=float, help="EMA decay ceiling (with warmup: 1 - (1 + step)^-2/3 until then)")
    run_group.add_argument("--heldout_steps", type=int,
                           help="every N steps, the EMA model's loss on the val split's latents (logged as "
                                "heldout_loss; rising while the training loss falls = memorising); final_model "
                                "keeps the weights of its lowest value; 0 = never measure, keep the last")
    run_group.add_argument("--heldout_patience", type=int,
                           help="stop once the held-out loss has not improved for N measurements in a row; 0 = "
                                "train every step")
    run_group.add_argument("--validation_users", type=int, help="users in each validation grid")
    run_group.add_argument("--validation_seeds", type=int, help="images per user in each validation grid")
    run_group.add_argument("--num_inference_steps", type=int, help="DPM-Solver++ steps for validation samples")
    run_group.add_argument("--guidance_scale", type=float, help="classifier-free guidance for validation samples")
    run_group.add_argument("--push_to_hub", metavar="REPO_ID",
                           help="also upload final_model to this Hugging Face Hub model repository (needs the "
                                "network and a token: huggingface-cli login or HF_TOKEN)")
    return p.parse_args(argv)


def check_hub(repo_id):
    """Refuse --push_to_hub before any training when the hub is switched off."""
    from huggingface_hub import constants

    if repo_id and constants.HF_HUB_OFFLINE:
        raise UsageError(f"--push_to_hub {repo_id}: HF_HUB_OFFLINE is set, so nothing can be uploaded; "
                         "unset it, or upload final_model later with `huggingface-cli upload`")


def push_to_hub(repo_id, folder):
    """Upload a saved final_model; a failure leaves it saved and says how to retry."""
    from huggingface_hub import create_repo, upload_folder

    try:
        create_repo(repo_id, repo_type="model", exist_ok=True)
        url = upload_folder(repo_id=repo_id, folder_path=folder, commit_message="final_model of train_diffusion.py")
    except Exception as error:  # noqa: BLE001 - network, token, permissions: the model is saved either way
        print(f"error: --push_to_hub {repo_id} failed ({str(error).splitlines()[0]}); {folder} is saved, upload it "
              f"with `huggingface-cli upload {repo_id} {folder}`", file=sys.stderr)
        return 1
    print(f"uploaded {folder} to {url}")
    return 0


def main(args):
    check_hub(args.push_to_hub)
    data_dir = check_data_dir(args.data_dir)
    vae, manifest = trained_vae(args.vae_path, args.manifest)
    manifest.check_matches(data_dir)
    config = resolve_diffusion_config({k: v for k, v in vars(args).items() if k != "push_to_hub"}, vae.config)
    output_dir = Path(config.output_dir)
    if config.dry_run:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    resume_from = resume_point(output_dir, config.resume_from_checkpoint, config, RESUMABLE_ARCHITECTURE,
                               UNRECORDED_ARCHITECTURE)

    accelerator = make_accelerator(config.device, config.mixed_precision, config.gradient_accumulation_steps,
                                   config.report_to, output_dir)
    torch.manual_seed(config.seed)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    cache = load_or_build_cache(accelerator, vae, config.vae_path, data_dir, manifest, config.resolution,
                                config.batch_size, output_dir)
    heldout_cache = None
    if config.heldout_steps and manifest.samples("val"):
        heldout_cache = load_or_build_cache(accelerator, vae, config.vae_path, data_dir, manifest, config.resolution,
                                            config.batch_size, output_dir, split="val")
    vae.to(accelerator.device)
    dataset = LatentDataset(cache)
    if len(dataset) < config.batch_size:
        raise UsageError(f"{len(dataset)} train images: too few for --batch_size {config.batch_size}")
    weights = user_weights(cache["user_index"]) if config.balance_users else None
    loader = accelerator.prepare(train_loader(dataset, config.batch_size, config.seed, weights=weights))
    # Per process: each step takes one batch on every process (the effective batch is batch x processes).
    max_steps, steps_per_epoch = total_steps(config.max_train_steps, config.num_epochs, len(loader),
                                             config.gradient_accumulation_steps)
    training = build_diffusion_training(config, accelerator, manifest.num_users, manifest.null_index, max_steps)
    step, metrics = start_run(accelerator, output_dir, resume_from, config.seed)
    if accelerator.is_main_process:
        manifest.save(output_dir / MANIFEST_NAME)
        written = write_run_config(accelerator, output_dir, config, max_steps, "train_diffusion",
                                   num_users=manifest.num_users, null_index=manifest.null_index)
        parameters = sum(p.numel() for p in training.denoiser.parameters())
        print(
            f"train_diffusion: preset {config.preset}, {manifest.num_users} users (+ null token {manifest.null_index}), "
            f"{len(dataset)} cached train latents {'x'.join(map(str, config.latent_shape))}, "
            f"{parameters / 1e6:.2f} M parameters\n"
            f"  steps {step} -> {max_steps}, effective batch {written['effective_batch_size']}, lr {config.learning_rate} "
            f"warmup {config.warmup_steps} cosine, {config.prediction_type}"
            f"{f', Min-SNR gamma {config.snr_gamma}' if config.snr_gamma else ''}, condition dropout "
            f"{config.condition_dropout}, EMA {'on' if training.ema else 'off'}, {accelerator.device}, "
            f"precision {config.mixed_precision}"
            + (f"\n  resumed from {resume_from}" if resume_from else "")
        )

    selection = None
    if heldout_cache is not None:
        selection = HeldoutSelection(accelerator, training, config, heldout_cache, output_dir, metrics.read())
    started = time.perf_counter()
    last_step = train_loop(
        accelerator, loader, training.step, modules=training.modules, lr_scheduler=training.lr_scheduler,
        metrics=metrics, output_dir=output_dir, start_step=step, max_steps=max_steps, steps_per_epoch=steps_per_epoch,
        gradient_accumulation_steps=config.gradient_accumulation_steps, checkpointing_steps=config.checkpointing_steps,
        checkpoints_total_limit=config.checkpoints_total_limit, validation_steps=config.validation_steps,
        validate=lambda at: validate(accelerator, training, vae, config, manifest, at, output_dir),
        curve_keys=["loss", "heldout_loss", "lr"], desc="diffusion", heldout_steps=config.heldout_steps,
        heldout=selection,
    )
    if accelerator.is_main_process:
        training.swap_in_ema()
        weights = selection.load_best(last_step) if selection else None
        final = save_generator(training.denoiser, training.noise_scheduler, config, manifest, output_dir / "final_model",
                               weights=weights)
        print(f"saved {final}{f' ({weights})' if weights else ''}; training took {time.perf_counter() - started:.0f} s")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if args.push_to_hub and accelerator.is_main_process:
        return push_to_hub(args.push_to_hub, output_dir / "final_model")
    return 0


if __name__ == "__main__":
    run(main, parse_args())
