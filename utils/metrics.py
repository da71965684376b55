"""Image quality metrics on tensors in [-1, 1]: PSNR and SSIM (torchmetrics) and LPIPS.

Every function returns one value per image, so callers can average per user.
"""

import importlib.util
import warnings
from pathlib import Path

import torch

# The torchvision backbone files LPIPS needs, as torch.hub caches them.
LPIPS_BACKBONE_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}


def to_unit_range(images):
    return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)


@torch.no_grad()
def psnr(reconstructions, originals):
    """PSNR in dB per image, (B,), on the [0, 1] range."""
    from torchmetrics.functional.image import peak_signal_noise_ratio  # imported when used: seconds to import

    return peak_signal_noise_ratio(
        to_unit_range(reconstructions), to_unit_range(originals), data_range=1.0, reduction="none", dim=(1, 2, 3)
    )


@torch.no_grad()
def ssim(reconstructions, originals):
    """SSIM per image, (B,), Gaussian window 11, on the [0, 1] range."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(
        to_unit_range(reconstructions), to_unit_range(originals), data_range=1.0, reduction="none"
    )


class LpipsUnavailable(RuntimeError):
    """The LPIPS backbone weights are neither cached nor downloadable."""


def lpips_backbone_path(net="alex"):
    return Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONE_FILES[net]


def check_lpips(net="alex"):
    """Raise LpipsUnavailable, saying what to do, unless the lpips package and its backbone
    weights are both here (they are never downloaded: an offline machine would hang)."""
    if not lpips_backbone_path(net).exists():
        raise LpipsUnavailable(
            f"LPIPS backbone weights {lpips_backbone_path(net)} are missing: run `python install_lpips.py` "
            f"(or `python install_lpips.py --weights FILE` offline), or set --perceptual_weight 0"
        )
    if importlib.util.find_spec("lpips") is None:
        raise LpipsUnavailable("the lpips package is not installed: run `python install_lpips.py`")


def load_lpips(net="alex", random_backbone=False):
    """The LPIPS metric with its real ImageNet backbone, frozen, in eval mode.

    Raises LpipsUnavailable (see `check_lpips`) when it cannot. `random_backbone=True` gives LPIPS with
    an untrained backbone, for tests only: its numbers mean nothing.
    """
    if not random_backbone:
        check_lpips(net)
    import lpips

    with warnings.catch_warnings():
        # lpips 0.1.4 calls torchvision with the deprecated `pretrained=` argument.
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=random_backbone, verbose=False).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model
