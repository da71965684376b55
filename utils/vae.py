"""A trained stage-1 VAE as the later stages use it: load a final_model folder with a
clear error, and reconstruct through the posterior mode."""

import json
from pathlib import Path

import torch

from utils.cli import UsageError
from utils.data_loader import MANIFEST_NAME, DatasetManifest


def load_vae(vae_path, flag="--vae_path", torch_dtype=None):
    """An AutoencoderKL from a save_pretrained folder (weights in `torch_dtype`, default as saved), or a clear error."""
    from diffusers import AutoencoderKL

    vae_path = Path(vae_path)
    config_path = vae_path / "config.json"
    if not config_path.exists():
        raise UsageError(f"{flag} {vae_path} is not a VAE folder: no config.json (expected a stage-1 final_model/)")
    try:
        class_name = json.loads(config_path.read_text()).get("_class_name")
    except json.JSONDecodeError:
        class_name = None
    if class_name != "AutoencoderKL":
        raise UsageError(f"{flag} {vae_path} holds a {class_name or 'unknown'} config, not an AutoencoderKL")
    try:
        return AutoencoderKL.from_pretrained(vae_path, torch_dtype=torch_dtype).eval()
    except (OSError, ValueError, RuntimeError) as error:
        raise UsageError(f"{flag} {vae_path}: cannot load the weights ({str(error).splitlines()[0]})") from None


def load_vae_manifest(vae_path, flag="--vae_path"):
    """The dataset manifest stored with a stage-1 final_model (label map and split)."""
    path = Path(vae_path) / MANIFEST_NAME
    if not path.exists():
        raise UsageError(f"{flag} {vae_path} has no {MANIFEST_NAME}: expected a stage-1 final_model/ folder")
    return DatasetManifest.load(path)


@torch.no_grad()
def reconstruct(vae, pixel_values):
    """Reconstruction through the posterior mode (deterministic), as evaluation uses."""
    return vae.decode(vae.encode(pixel_values).latent_dist.mode()).sample.clamp(-1, 1)


def reconstruct_uint8(vae, images_uint8, device, batch_size=64):
    """Reconstructions of (N, 3, R, R) uint8 images as uint8, in batches on `device`."""
    vae = vae.to(device)
    out = []
    for start in range(0, len(images_uint8), batch_size):
        x = (images_uint8[start:start + batch_size].float().to(device) / 127.5 - 1.0).to(vae.dtype)
        out.append(((reconstruct(vae, x).float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out) if out else images_uint8.clone()
