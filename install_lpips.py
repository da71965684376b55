"""Set up the LPIPS perceptual loss: the package and its ImageNet backbone weights.

    python install_lpips.py                      # install lpips if missing, fetch the backbone, verify
    python install_lpips.py --weights FILE       # offline: place a local backbone file where torch looks
    python install_lpips.py --check              # only report; exit 0 when LPIPS works, 1 otherwise

The backbone goes to $TORCH_HOME/hub/checkpoints/ under the name torchvision expects
(alexnet-owt-7be5be79.pth, vgg16-397923af.pth). This script never edits another script:
training reads --perceptual_weight, and stops with a message when LPIPS is unavailable.
"""

import argparse
import importlib.util
import shutil
import subprocess
import sys

import torch

from utils.cli import UsageError, run
from utils.files import atomic_path
from utils.metrics import LPIPS_BACKBONE_FILES, LpipsUnavailable, load_lpips, lpips_backbone_path

# A parameter every torchvision backbone state_dict of that name must hold.
EXPECTED_KEYS = {"alex": "features.0.weight", "vgg": "features.0.weight"}


def lpips_installed():
    return importlib.util.find_spec("lpips") is not None


def install_package():
    print("installing lpips with pip ...")
    result = subprocess.run([sys.executable, "-m", "pip", "install", "lpips>=0.1.4"])
    if result.returncode != 0:
        raise UsageError("pip could not install lpips; install it by hand: pip install lpips")


def place_weights(source, net):
    """Copy a local backbone file into the torch hub cache after checking it loads."""
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"--weights {source} does not exist") from None
    except Exception as error:  # torch raises several types for a file that is not a state_dict
        raise UsageError(f"--weights {source} is not a torch state_dict ({type(error).__name__})") from None
    if not isinstance(state, dict) or EXPECTED_KEYS[net] not in state:
        raise UsageError(f"--weights {source} is not a torchvision {net} backbone (no {EXPECTED_KEYS[net]})")
    target = lpips_backbone_path(net)
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
    print(f"placed {source} as {target}")


def download_weights(net):
    """Let torchvision download the backbone into the hub cache (needs the internet)."""
    import torchvision

    print(f"downloading the {net} backbone into {lpips_backbone_path(net).parent} ...")
    builder, weights = {
        "alex": (torchvision.models.alexnet, torchvision.models.AlexNet_Weights.IMAGENET1K_V1),
        "vgg": (torchvision.models.vgg16, torchvision.models.VGG16_Weights.IMAGENET1K_V1),
    }[net]
    try:
        builder(weights=weights)
    except Exception as error:  # URLError, socket errors, HTTP errors: all mean "no download"
        raise UsageError(
            f"cannot download the {net} backbone ({type(error).__name__}); on an offline machine copy "
            f"{LPIPS_BACKBONE_FILES[net]} here and run: python install_lpips.py --weights FILE"
        ) from None


def verify(net):
    """LPIPS of an image with itself (0) and with a shifted copy (> 0)."""
    model = load_lpips(net)
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 64, 64, generator=generator) * 2 - 1
    with torch.no_grad():
        same = model(image, image).item()
        shifted = model(image, torch.roll(image, 8, dims=-1)).item()
    return same, shifted


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Install LPIPS and its backbone weights, then verify them.")
    p.add_argument("--net", choices=sorted(LPIPS_BACKBONE_FILES), default="alex", help="LPIPS backbone (default alex)")
    p.add_argument("--weights", help="a local backbone file to place in the torch hub cache (offline machines)")
    p.add_argument("--check", action="store_true", help="only report whether LPIPS works; change nothing")
    return p.parse_args(argv)


def main(args):
    target = lpips_backbone_path(args.net)
    if args.check:
        print(f"lpips package: {'installed' if lpips_installed() else 'missing'}")
        print(f"{args.net} backbone: {target} ({'present' if target.exists() else 'missing'})")
    else:
        if not lpips_installed():
            install_package()
        if args.weights:
            place_weights(args.weights, args.net)
        elif not target.exists():
            download_weights(args.net)
    try:
        same, shifted = verify(args.net)
    except LpipsUnavailable as error:
        print(f"LPIPS unavailable: {error}")
        return 1
    print(f"LPIPS works: d(x, x) = {same:.4f}, d(x, shifted x) = {shifted:.4f}")
    return 0


if __name__ == "__main__":
    run(main, parse_args())
