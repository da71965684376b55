"""The environment doctor behind ultimate_fix_kaggle.py: report, check, and (only when
asked) install what this project needs. It never uninstalls anything, and it imports
nothing of the project's stack at module level, so it runs where that stack is broken.

It reports Python, the GPU and CUDA, and the versions of the stack; checks the known
incompatibilities (a diffusers that imports a huggingface_hub name the installed hub
removed; a torchvision built for another torch; numpy 2 under a torch built for numpy 1;
versions below requirements.txt); warns (without failing) when the LPIPS backbone weights
are absent; then imports the stack and runs a tiny VAE and UNet forward pass.
"""

import importlib
import importlib.metadata
import platform
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

REPO_ROOT = Path(__file__).resolve().parents[1]
# Reported in this order; the import name where it differs from the distribution name.
PACKAGES = {
    "torch": "torch", "torchvision": "torchvision", "diffusers": "diffusers", "transformers": "transformers",
    "accelerate": "accelerate", "huggingface_hub": "huggingface_hub", "lpips": "lpips", "numpy": "numpy",
    "pillow": "PIL", "safetensors": "safetensors", "torchmetrics": "torchmetrics", "scipy": "scipy",
    "matplotlib": "matplotlib", "tqdm": "tqdm",
}


def installed_versions():
    """Distribution name -> version string, None when not installed (read without importing)."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def requirements():
    """Distribution name -> packaging Requirement, from requirements.txt."""
    found = {}
    for line in (REPO_ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            found[requirement.name.lower().replace("-", "_")] = requirement
    return found


def release(version):
    return Version(version).release + (0, 0)


def check_versions(versions):
    """Problems with a set of versions, each (message, pip arguments that fix it or None).
    Pure: tests pass faked version sets."""
    problems = []
    wanted = requirements()
    for name, version in versions.items():
        requirement = wanted.get(name)
        if requirement is None:
            continue
        if version is None:
            problems.append((f"{name} is not installed", [str(requirement)]))
        elif not requirement.specifier.contains(version, prereleases=True):
            problems.append((f"{name} {version} is older than this project needs ({requirement})", [str(requirement)]))
    torch_version, vision = versions.get("torch"), versions.get("torchvision")
    if torch_version and vision:
        torch_major, torch_minor = release(torch_version)[:2]
        # torchvision 0.(m+15) is built for torch 2.m (0.15 <-> 2.0 ... 0.29 <-> 2.14).
        if torch_major == 2 and release(vision)[:2] != (0, torch_minor + 15):
            expected = f"0.{torch_minor + 15}"
            problems.append((f"torchvision {vision} is not built for torch {torch_version} (needs {expected}.x); "
                             "image ops and lpips fail to load", [f"torchvision=={expected}.*"]))
    numpy_version = versions.get("numpy")
    if torch_version and numpy_version and release(numpy_version)[0] >= 2 and release(torch_version)[:2] < (2, 3):
        problems.append((f"numpy {numpy_version} under torch {torch_version}, which was built for numpy 1 "
                         "(tensor <-> array conversion breaks)", ["numpy<2"]))
    diffusers_version, hub = versions.get("diffusers"), versions.get("huggingface_hub")
    # diffusers stopped importing cached_download in 0.29; huggingface_hub removed it in 0.26.
    if diffusers_version and hub and release(diffusers_version)[:2] < (0, 29) and release(hub)[:2] >= (0, 26):
        problems.append((f"diffusers {diffusers_version} imports huggingface_hub.cached_download, which "
                         f"huggingface_hub {hub} no longer has", ["diffusers>=0.29"]))
    accelerate_version = versions.get("accelerate")
    if accelerate_version and torch_version and release(accelerate_version)[:2] < (1, 1) \
            and release(torch_version)[:2] >= (2, 6):
        problems.append((f"accelerate {accelerate_version} cannot reload its own RNG states under torch "
                         f"{torch_version} (weights_only loading): --resume_from_checkpoint fails", ["accelerate>=1.1"]))
    return problems


def fix_commands(problems):
    """One pip install with every fix: installs or upgrades only what is named, never uninstalls."""
    arguments = []
    for _, fix in problems:
        for argument in fix or []:
            if argument not in arguments:
                arguments.append(argument)
    return [[sys.executable, "-m", "pip", "install", *arguments]] if arguments else []


def run_pip(command):
    return subprocess.run(command).returncode


def import_problems():
    """Import every installed package of the stack; an ImportError is a problem (e.g. a
    diffusers that imports a name the installed huggingface_hub dropped)."""
    problems = []
    for name, module in PACKAGES.items():
        try:
            importlib.import_module(module)
        except ImportError as error:
            problems.append((f"import {module} fails: {str(error).splitlines()[0]}", None))
        except Exception as error:  # a broken package may raise anything on import
            problems.append((f"import {module} fails: {type(error).__name__}: {str(error).splitlines()[0]}", None))
    return problems


def gpu_report():
    import torch

    lines = [f"torch CUDA build: {torch.version.cuda or 'none (CPU build)'}"]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            lines.append(f"GPU {index}: {props.name}, {props.total_memory / 2**30:.1f} GiB, "
                         f"compute capability {props.major}.{props.minor}")
    else:
        lines.append("GPU: none visible (training runs on the CPU; --device cpu)")
    return lines


def smoke_test():
    """A tiny AutoencoderKL and UNet2DConditionModel forward pass on the best device."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4).to(device)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                                cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8).to(device)
    with torch.no_grad():
        latents = vae.encode(torch.randn(1, 3, 16, 16, device=device)).latent_dist.sample()
        noise = unet(latents, torch.tensor([10], device=device), torch.randn(1, 2, 16, device=device)).sample
        image = vae.decode(noise).sample
    if not torch.isfinite(image).all():
        raise RuntimeError("the forward pass produced non-finite values")
    return f"tiny VAE + UNet forward pass on {device}: ok, output {tuple(image.shape)}"


def lpips_warning():
    import os

    torch_home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
    weights = torch_home / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    if not weights.is_file():
        return (f"LPIPS backbone weights absent ({weights}): training uses no perceptual loss until "
                "`python install_lpips.py` (online) or `--weights FILE` places them")
    return None


def diagnose(fix=False, yes=False, skip_smoke_test=False):
    """Report, check and (with `fix` and `yes`) repair; 0 when healthy, else 1."""
    print(f"Python {platform.python_version()} ({sys.executable}) on {platform.platform()}")
    versions = installed_versions()
    for name, version in versions.items():
        print(f"  {name:16s} {version or 'not installed'}")
    problems = check_versions(versions)
    if sys.version_info < (3, 9):
        problems.append((f"Python {platform.python_version()} is older than 3.9", None))
    warnings = []
    if not problems and not skip_smoke_test:
        problems += import_problems()
        if not problems:
            print("\n".join(gpu_report()))
            try:
                print(smoke_test())
            except Exception as error:
                problems.append((f"tiny forward pass failed: {type(error).__name__}: {error}", None))
    if versions.get("lpips") and (warning := lpips_warning()):
        warnings.append(warning)
    for warning in warnings:
        print(f"WARNING: {warning}")
    for message, _ in problems:
        print(f"PROBLEM: {message}")
    if not problems:
        print("healthy: this environment runs the project")
        return 0
    commands = fix_commands(problems)
    if fix:
        if not commands:
            print("no pip command fixes these; see the messages above")
        for command in commands:
            print("fix: " + " ".join(f'"{a}"' if any(c in a for c in "<>=*") else a for a in command))
            if yes:
                code = run_pip(command)
                if code != 0:
                    print(f"pip failed with exit code {code}")
                    return 1
        if yes and commands:
            print("installed; restart the notebook kernel (or the shell) and run this doctor again")
    else:
        print(f"{len(problems)} problem(s); `python ultimate_fix_kaggle.py --fix` prints the pip commands that fix them")
    return 1
