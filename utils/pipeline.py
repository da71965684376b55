"""The stage-2 generator as a diffusers pipeline.

    pipe = UserDiffusionPipeline.from_pretrained("outputs/diffusion/final_model")
    images = pipe(users=[1, 5, "ID_10"], num_images_per_user=4, guidance_scale=3.0,
                  num_inference_steps=25, generator=torch.Generator().manual_seed(0)).images

Users are named as in the dataset (folder name, or its number: 7 -> ID_7 / user_07) and
mapped through the label map stored with the model, never re-sorted. Every image gets
its own seed (drawn from `generator` unless `seeds` are given); the seeds come back with
the images, so any one image can be regenerated alone.
"""

import json
import shutil
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from utils.cli import UsageError
from utils.condition_encoder import UserConditionEncoder
from utils.data_loader import MANIFEST_NAME, DatasetManifest
from utils.files import atomic_folder, write_json
from utils.image_grid import to_pil
from utils.sampling import (DEFAULT_SAMPLER, GENERATOR_INFO, SAMPLERS, decode_latents, encode_images, make_sampler,
                            sample_latents)
from utils.vae import load_vae

MODEL_PARTS = ("vae/config.json", "unet/config.json", "condition_encoder/config.json",
               "scheduler/scheduler_config.json", GENERATOR_INFO, MANIFEST_NAME)


def save_generator(denoiser, noise_scheduler, config, manifest, folder):
    """A stage-2 final_model: everything generation needs, loadable without the data folder.

    vae/ (the stage-1 final_model, copied), unet/ and condition_encoder/ (save_pretrained),
    condition_encoder.pt (plain state_dict, for the original three-path command),
    scheduler/, generator.json (label map, null index, latent scaling and shape,
    resolution, sampling defaults) and the dataset manifest. `config` is the resolved
    stage-2 configuration; `denoiser` holds the weights to ship (EMA's, when used)."""
    with atomic_folder(folder) as partial:
        shutil.copytree(config.vae_path, partial / "vae")
        denoiser.unet.save_pretrained(partial / "unet", safe_serialization=True)
        denoiser.condition_encoder.save_pretrained(partial / "condition_encoder", safe_serialization=True)
        torch.save(denoiser.condition_encoder.state_dict(), partial / "condition_encoder.pt")
        noise_scheduler.save_pretrained(partial / "scheduler")
        write_json(partial / GENERATOR_INFO, {
            "users": manifest.users,
            "label_map": manifest.label_map,
            "num_users": manifest.num_users,
            "null_index": manifest.null_index,
            "resolution": config.resolution,
            "latent_shape": list(config.latent_shape),
            "scaling_factor": config.latent_scaling_factor,
            "prediction_type": config.prediction_type,
            "guidance_scale": config.guidance_scale,
            "num_inference_steps": config.num_inference_steps,
            "ema": bool(config.use_ema),
        })
        manifest.save(partial / MANIFEST_NAME)
    return Path(folder)


class UserImagesOutput(BaseOutput):
    images: list  # PIL images, or a (B, 3, R, R) tensor in [-1, 1] with output_type="pt"
    users: list  # the user folder name of each image
    seeds: list  # the seed of each image


class UserDiffusionPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "condition_encoder->unet->vae"

    def __init__(self, vae, unet, condition_encoder, scheduler):
        super().__init__()
        self.register_modules(vae=vae, unet=unet, condition_encoder=condition_encoder, scheduler=scheduler)
        self.info = {}
        self.manifest = None

    @classmethod
    def from_pretrained(cls, model_path, scheduler=DEFAULT_SAMPLER, torch_dtype=None, flag="--model_path"):
        """Everything from a stage-2 final_model folder: no data folder, no pickles."""
        from diffusers import DDPMScheduler, UNet2DConditionModel

        path = Path(model_path)
        if not path.is_dir():
            raise UsageError(f"{flag} {path} does not exist (expected a stage-2 final_model/ folder)")
        missing = [part for part in MODEL_PARTS if not (path / part).exists()]
        if missing:
            raise UsageError(f"{flag} {path} is not a complete stage-2 final_model: missing {', '.join(missing)}")
        info = json.loads((path / GENERATOR_INFO).read_text())
        try:
            unet = UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=torch_dtype).eval()
            encoder = UserConditionEncoder.from_pretrained(path / "condition_encoder", torch_dtype=torch_dtype).eval()
            scheduler_config = DDPMScheduler.load_config(path / "scheduler")
        except (OSError, ValueError, RuntimeError) as error:
            raise UsageError(f"{flag} {path}: cannot load the model ({str(error).splitlines()[0]})") from None
        vae = load_vae(path / "vae", flag, torch_dtype)
        manifest = DatasetManifest.load(path / MANIFEST_NAME)
        if manifest.label_map != info["label_map"] or encoder.config.num_users != manifest.num_users:
            raise UsageError(f"{flag} {path}: generator.json, the manifest and the condition encoder disagree on the users")
        pipe = cls(vae, unet, encoder, make_sampler(scheduler_config, scheduler))
        pipe.info, pipe.manifest, pipe.sampler_name = info, manifest, scheduler
        return pipe

    @classmethod
    def from_parts(cls, vae_path, unet_path, condition_encoder_path, num_users, scheduler=DEFAULT_SAMPLER, torch_dtype=None):
        """The original project's three-path form. The label map comes from the manifest
        stored with the VAE; the sampling settings from the generator.json beside the UNet
        (a stage-2 final_model's unet/ folder)."""
        from diffusers import UNet2DConditionModel
        from utils.vae import load_vae_manifest

        vae = load_vae(vae_path, torch_dtype=torch_dtype)
        manifest = load_vae_manifest(vae_path)
        unet_path, encoder_path = Path(unet_path), Path(condition_encoder_path)
        if not (unet_path / "config.json").exists():
            raise UsageError(f"--unet_path {unet_path} is not a UNet folder: no config.json")
        if not encoder_path.exists():
            raise UsageError(f"--condition_encoder_path {encoder_path} does not exist")
        try:
            unet = UNet2DConditionModel.from_pretrained(unet_path, torch_dtype=torch_dtype).eval()
            if encoder_path.is_dir():
                encoder = UserConditionEncoder.from_pretrained(encoder_path, torch_dtype=torch_dtype).eval()
            else:
                state = torch.load(encoder_path, map_location="cpu", weights_only=True)
                rows, width = state["embedding.weight"].shape
                token_width = state["norm.weight"].shape[0]
                encoder = UserConditionEncoder(rows - 1, token_width, state["mlp.2.weight"].shape[0] // token_width, width)
                encoder.load_state_dict(state)
                if torch_dtype is not None:  # torch's plain cast: diffusers' .to() warns about fp32 modules it has none of
                    torch.nn.Module.to(encoder, torch_dtype)
                encoder = encoder.eval()
        except (OSError, ValueError, RuntimeError, KeyError) as error:
            raise UsageError(f"cannot load the UNet or the condition encoder ({str(error).splitlines()[0]})") from None
        if encoder.config.num_users != num_users:
            raise UsageError(
                f"--num_users {num_users}, but the condition encoder was trained on {encoder.config.num_users} users "
                f"(+1 null row)"
            )
        if manifest.num_users != num_users:
            raise UsageError(f"--num_users {num_users}, but the VAE's dataset manifest lists {manifest.num_users} users")
        stored = unet_path.parent / GENERATOR_INFO
        if not (stored.exists() and (unet_path.parent / "scheduler/scheduler_config.json").exists()):
            raise UsageError(
                f"--unet_path {unet_path}: no {GENERATOR_INFO} and scheduler/ beside it; "
                "give the unet/ folder inside a stage-2 final_model (or use --model_path)"
            )
        info = json.loads(stored.read_text())
        scheduler_config = json.loads((unet_path.parent / "scheduler/scheduler_config.json").read_text())
        pipe = cls(vae, unet, encoder, make_sampler(scheduler_config, scheduler))
        pipe.info, pipe.manifest, pipe.sampler_name = info, manifest, scheduler
        return pipe

    def use_scheduler(self, name):
        """Switch the sampler (a key of utils.sampling.SAMPLERS), keeping the trained schedule."""
        self.scheduler = make_sampler(self.scheduler.config, name)
        self.sampler_name = name
        return self

    @torch.no_grad()
    def __call__(self, users, num_images_per_user=1, guidance_scale=None, num_inference_steps=None,
                 generator=None, seeds=None, output_type="pil", source_images=None, strength=1.0):
        """Images of the given users, `num_images_per_user` each, user by user.

        guidance_scale / num_inference_steps default to the values stored with the model
        and to the scheduler's default step count. `source_images` ((B, 3, R, R) in [-1, 1],
        one per image) with `strength` < 1: image to image, each source noised part of the
        way and denoised as the user (utils.sampling.sample_latents)."""
        names = [name for name in self.manifest.resolve_users(users) for _ in range(num_images_per_user)]
        if seeds is None:
            seeds = torch.randint(0, 2**31 - 1, (len(names),), generator=generator).tolist()
        if len(seeds) != len(names):
            raise ValueError(f"{len(seeds)} seeds for {len(names)} images")
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        if source_images is not None and len(source_images) != len(names):
            raise ValueError(f"{len(source_images)} source images for {len(names)} images")
        device = self._execution_device
        indices = torch.tensor([self.manifest.label_map[n] for n in names], device=device)
        start = None if source_images is None else encode_images(self.vae, source_images, self.info["scaling_factor"])
        latents = sample_latents(
            self.unet, self.condition_encoder, self.scheduler, indices, seeds, self.info["latent_shape"],
            self.info["guidance_scale"] if guidance_scale is None else guidance_scale,
            num_inference_steps or SAMPLERS[self.sampler_name][1], progress=self.progress_bar,
            start_latents=start, strength=strength,
        )
        images = decode_latents(self.vae, latents, self.info["scaling_factor"])
        if output_type == "pil":
            images = [to_pil(image) for image in images]
        return UserImagesOutput(images=images, users=names, seeds=[int(s) for s in seeds])
