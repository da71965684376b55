"""The stage-2 generator as a diffusers pipeline.

    pipe = load_generator("outputs/diffusion/final_model")
    images = pipe(users=[1, 5, "ID_10"], num_images_per_user=4, guidance_scale=3.0,
                  num_inference_steps=25, generator=torch.Generator().manual_seed(0)).images

A final_model folder is a diffusers pipeline folder (model_index.json written by
`save_pretrained`): `UserDiffusionPipeline.from_pretrained(path)` and diffusers'
`DiffusionPipeline.from_pretrained(path, custom_pipeline="utils/pipeline.py",
trust_remote_code=True)` (run from the project's root) load it too; `load_generator` adds readable errors and the dataset manifest stored beside it.
The label map, null index, latent scaling, latent shape and resolution are the
pipeline's registered config. `scheduler` is the training noise schedule, kept exactly;
sampling builds the sampler named by `config.sampler` from it (`use_scheduler`).

Users are named as in the dataset (folder name, or its number: 7 -> ID_7 / user_07) and
mapped through the stored label map, never re-sorted. Every image gets its own seed
(drawn from `generator` unless `seeds` are given); the seeds come back with the images,
so any one image can be regenerated alone.
"""

import json
import shutil
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils import logging as diffusers_logging

from utils.cli import UsageError
from utils.condition_encoder import UserConditionEncoder
from utils.data_loader import MANIFEST_NAME, SPLITS, DatasetManifest
from utils.files import atomic_folder, atomic_path
from utils.image_grid import to_pil
from utils.sampling import DEFAULT_SAMPLER, SAMPLERS, decode_latents, encode_images, make_sampler, sample_latents
from utils.vae import load_vae

PIPELINE_INDEX = "model_index.json"
LEGACY_SETTINGS = "generator.json"  # where final_model folders made before model_index.json kept the settings
MODEL_CARD = "README.md"
EVALUATION_HEADING = "## Evaluation"
MODEL_PARTS = (PIPELINE_INDEX, "vae/config.json", "unet/config.json", "condition_encoder/config.json",
               "scheduler/scheduler_config.json", MANIFEST_NAME)
SETTINGS = ("label_map", "null_index", "resolution", "latent_shape", "scaling_factor", "guidance_scale", "sampler", "ema")


def check_sampler(name):
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; one of {', '.join(SAMPLERS)}")


class UserImagesOutput(BaseOutput):
    images: list  # PIL images, or a (B, 3, R, R) tensor in [-1, 1] with output_type="pt"
    users: list  # the user folder name of each image
    seeds: list  # the seed of each image


class UserDiffusionPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "condition_encoder->unet->vae"

    # The settings have defaults because diffusers takes every parameter without one for a component.
    def __init__(self, vae, unet, condition_encoder, scheduler, label_map=None, null_index=None, resolution=None,
                 latent_shape=None, scaling_factor=None, guidance_scale=1.0, sampler=DEFAULT_SAMPLER, ema=False):
        super().__init__()
        self.register_modules(vae=vae, unet=unet, condition_encoder=condition_encoder, scheduler=scheduler)
        if label_map is None or resolution is None or latent_shape is None or scaling_factor is None:
            raise ValueError("label_map, resolution, latent_shape and scaling_factor are required")
        if sorted(label_map.values()) != list(range(len(label_map))) or null_index != len(label_map):
            raise ValueError("label_map must number the users 0..N-1 and null_index be N")
        if condition_encoder.config.num_users != len(label_map):
            raise ValueError(f"the condition encoder has {condition_encoder.config.num_users} users, "
                             f"the label map {len(label_map)}")
        check_sampler(sampler)
        self.register_to_config(label_map=dict(label_map), null_index=null_index, resolution=resolution,
                                latent_shape=list(latent_shape), scaling_factor=scaling_factor,
                                guidance_scale=guidance_scale, sampler=sampler, ema=ema)
        # The users alone; load_generator puts the whole stored manifest (the split) here.
        self.manifest = DatasetManifest(users=sorted(label_map, key=label_map.get), splits={s: {} for s in SPLITS})

    @classmethod
    def from_parts(cls, vae_path, unet_path, condition_encoder_path, num_users, scheduler=DEFAULT_SAMPLER, torch_dtype=None):
        """The original project's three-path form. The label map comes from the manifest
        stored with the VAE; the settings from the final_model folder the UNet is in."""
        from diffusers import DDPMScheduler, UNet2DConditionModel
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
        folder = unet_path.parent
        settings = stored_settings(folder)
        if settings is None or not (folder / "scheduler/scheduler_config.json").exists():
            raise UsageError(
                f"--unet_path {unet_path}: no {PIPELINE_INDEX} and scheduler/ beside it; "
                "give the unet/ folder inside a stage-2 final_model (or use --model_path)"
            )
        if settings["label_map"] != manifest.label_map:
            raise UsageError(f"--unet_path {unet_path}: its model was trained on other users than the VAE's manifest lists")
        pipe = cls(vae, unet, encoder, DDPMScheduler.from_pretrained(folder / "scheduler"), **settings)
        pipe.manifest = manifest
        return pipe.use_scheduler(scheduler)

    def use_scheduler(self, name):
        """Sample with another sampler (a key of utils.sampling.SAMPLERS), built from the
        training schedule; saved with the pipeline."""
        check_sampler(name)
        self.register_to_config(sampler=name)
        return self

    @torch.no_grad()
    def __call__(self, users, num_images_per_user=1, guidance_scale=None, num_inference_steps=None,
                 generator=None, seeds=None, output_type="pil", source_images=None, strength=1.0):
        """Images of the given users, `num_images_per_user` each, user by user.

        guidance_scale / num_inference_steps default to the value stored with the model
        and to the sampler's default step count. `source_images` ((B, 3, R, R) in [-1, 1],
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
        label_map = self.config.label_map
        indices = torch.tensor([label_map[n] for n in names], device=device)
        scaling = self.config.scaling_factor
        start = None if source_images is None else encode_images(self.vae, source_images, scaling)
        latents = sample_latents(
            self.unet, self.condition_encoder, make_sampler(self.scheduler.config, self.config.sampler), indices, seeds,
            self.config.latent_shape, self.config.guidance_scale if guidance_scale is None else guidance_scale,
            num_inference_steps or SAMPLERS[self.config.sampler][1], progress=self.progress_bar,
            start_latents=start, strength=strength,
        )
        images = decode_latents(self.vae, latents, scaling)
        if output_type == "pil":
            images = [to_pil(image) for image in images]
        return UserImagesOutput(images=images, users=names, seeds=[int(s) for s in seeds])


def stored_settings(folder):
    """The pipeline settings stored in a final_model folder (model_index.json, or the
    generator.json of a folder made before it); None when neither is there."""
    for name in (PIPELINE_INDEX, LEGACY_SETTINGS):
        if (Path(folder) / name).is_file():
            stored = json.loads((Path(folder) / name).read_text())
            return {key: stored[key] for key in SETTINGS if key in stored}
    return None


def load_generator(model_path, scheduler=DEFAULT_SAMPLER, torch_dtype=None, flag="--model_path"):
    """A stage-2 final_model folder as a pipeline with its dataset manifest, or a clear error."""
    path = Path(model_path)
    if not path.is_dir():
        raise UsageError(f"{flag} {path} does not exist (expected a stage-2 final_model/ folder)")
    if not (path / PIPELINE_INDEX).exists() and (path / LEGACY_SETTINGS).exists():  # made by an older version
        num_users = json.loads((path / LEGACY_SETTINGS).read_text())["num_users"]
        return UserDiffusionPipeline.from_parts(path / "vae", path / "unet", path / "condition_encoder", num_users,
                                                scheduler, torch_dtype)
    missing = [part for part in MODEL_PARTS if not (path / part).exists()]
    if missing:
        raise UsageError(f"{flag} {path} is not a complete stage-2 final_model: missing {', '.join(missing)}")
    diffusers_logging.disable_progress_bar()  # four parts load in a blink: no bar for them
    try:
        pipe = UserDiffusionPipeline.from_pretrained(path)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as error:
        raise UsageError(f"{flag} {path}: cannot load the model ({str(error).splitlines()[0]})") from None
    finally:
        diffusers_logging.enable_progress_bar()
    if torch_dtype is not None:  # cast after loading: the keyword's name differs between diffusers versions
        for module in (pipe.vae, pipe.unet, pipe.condition_encoder):
            torch.nn.Module.to(module, torch_dtype)  # torch's plain cast: diffusers' warns of fp32 parts none has
    manifest = DatasetManifest.load(path / MANIFEST_NAME)
    if manifest.label_map != pipe.config.label_map:
        raise UsageError(f"{flag} {path}: model_index.json and {MANIFEST_NAME} disagree on the users")
    pipe.manifest = manifest
    return pipe.use_scheduler(scheduler)


def save_generator(denoiser, noise_scheduler, config, manifest, folder, weights=None):
    """A stage-2 final_model: a diffusers pipeline folder, loadable without the data folder.

    model_index.json with the settings, vae/ (the stage-1 final_model), unet/
    condition_encoder/ scheduler/ (config + safetensors), condition_encoder.pt (a plain state_dict, for the original three-path
    command), the dataset manifest and a model card. `config` is the resolved stage-2
    configuration; `denoiser` holds the weights to ship (EMA's, when used), `weights` says
    which step they are from when not the last (the model card names it)."""
    pipe = UserDiffusionPipeline(
        load_vae(config.vae_path), denoiser.unet, denoiser.condition_encoder, noise_scheduler,
        label_map=manifest.label_map, null_index=manifest.null_index, resolution=config.resolution,
        latent_shape=list(config.latent_shape), scaling_factor=config.latent_scaling_factor,
        guidance_scale=config.guidance_scale, ema=bool(config.use_ema))
    with atomic_folder(folder) as partial:
        pipe.save_pretrained(partial, safe_serialization=True)
        shutil.rmtree(partial / "vae")  # the stage-1 folder as it is (its manifest and latent statistics too)
        shutil.copytree(config.vae_path, partial / "vae")
        torch.save(denoiser.condition_encoder.state_dict(), partial / "condition_encoder.pt")
        manifest.save(partial / MANIFEST_NAME)
        (partial / MODEL_CARD).write_text(model_card(pipe, manifest, config, weights))
    return Path(folder)


def model_card(pipe, manifest, config, weights=None):
    """The folder's README.md: what the model is, what it was trained on, how to load it."""
    counts = {split: len(manifest.samples(split)) for split in SPLITS}
    users = manifest.users
    named = " ".join(users) if len(users) <= 8 else f"{' '.join(users[:3])} ... {users[-1]}"
    data = Path(manifest.data_dir).name or "unknown"
    return f"""---
library_name: diffusers
tags: [micro-doppler, radar, gait-recognition, latent-diffusion, data-augmentation]
---
# User-conditioned latent diffusion for micro-Doppler spectrograms

Generates {pipe.config.resolution}x{pipe.config.resolution} colour micro-Doppler spectrograms of a chosen person: a
UNet2DConditionModel denoises {'x'.join(map(str, pipe.config.latent_shape))} latents of an AutoencoderKL, conditioned
on the user through a learned embedding (cross-attention{', and the timestep embedding' if pipe.unet.config.num_class_embeds else ''}{', which scales and shifts every ResNet block' if pipe.unet.config.resnet_time_scale_shift == 'scale_shift' else ''}),
with classifier-free guidance (null index {pipe.config.null_index}).

## Data
- dataset folder `{data}`: {len(users)} users ({named})
- split {manifest.describe()}: {counts['train']} train, {counts['val']} val, {counts['test']} test images; the model saw
  the train images only (dataset_manifest.json lists them)

## Training
- preset `{config.preset}`, {config.max_train_steps} steps, batch {config.batch_size}, learning rate {config.learning_rate},
  {noise_prediction(pipe)}, condition dropout {config.condition_dropout}, EMA {'on' if pipe.config.ema else 'off'}
{f"- this folder holds {weights}" + chr(10) if weights else ""}- sampling default: `{pipe.config.sampler}`, guidance {pipe.config.guidance_scale}

## Use
In a checkout of the microdoppler-aug project:
```python
from utils.pipeline import load_generator
pipe = load_generator("PATH/final_model")
images = pipe(users=["{users[0]}"], num_images_per_user=4).images
```
or with diffusers alone, from the project's root: `DiffusionPipeline.from_pretrained("PATH/final_model",
custom_pipeline="utils/pipeline.py", trust_remote_code=True)`; from the shell: `python inference/generate.py --model_path PATH/final_model
--user_ids all --num_images_per_user 20 --output_dir generated`.

{EVALUATION_HEADING}
Not evaluated yet: `python inference/evaluate.py --generated_dir ...` on images of this model writes its headline here.
"""


def noise_prediction(pipe):
    return f"{pipe.scheduler.config.prediction_type} prediction, {pipe.scheduler.config.num_train_timesteps} noise levels"


def record_evaluation(folder, lines):
    """Replace the model card's evaluation section with `lines` (the report's headline)."""
    card = Path(folder) / MODEL_CARD
    if not card.is_file() or EVALUATION_HEADING not in card.read_text():
        return False
    head = card.read_text().split(EVALUATION_HEADING)[0]
    with atomic_path(card) as tmp:
        tmp.write_text(head + EVALUATION_HEADING + "\n" + "\n".join(lines) + "\n")
    return True
