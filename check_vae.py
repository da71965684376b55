"""Stage-1 quality check: how well does a trained VAE reconstruct images it never saw?

    python check_vae.py --vae_path outputs/vae/final_model --data_dir data/simulated

Uses the split stored with the model (default: the test split; a --manifest must be that
split), the posterior mode (no
sampling noise), and reports PSNR / SSIM (and LPIPS when its backbone is installed): the
mean and the worst user, the latent statistics against the stored scaling factor, a
verdict, vae_check.json and a grid of originals over reconstructions. For scale, it
also reports the PSNR of a 2x bicubic down-and-up round trip of the same images.
Exit code 0 when the mean PSNR >= --min_psnr, 1 when below, 2 on bad input.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from utils.cli import HelpFormatter, UsageError, resolve_device, run
from utils.data_loader import SpectrogramDataset, add_split_arguments, check_data_dir
from utils.files import atomic_path, write_json
from utils.image_grid import labelled_grid, to_pil
from utils.metrics import LpipsUnavailable, load_lpips, psnr, ssim
from utils.recipes import default_vae_output_dir
from utils.vae import trained_vae

VERDICTS = [  # (margin over --min_psnr in dB, Chinese, English)
    (3.0, "优秀", "excellent"),
    (0.0, "良好", "good"),
    (-3.0, "一般", "fair"),
    (float("-inf"), "较差", "poor"),
]


def bicubic_round_trip(images):
    """The reference reconstruction: 2x bicubic down (antialiased) and back up. It keeps a
    quarter of the pixels; a latent keeps far fewer numbers. Speckle bounds both."""
    size = images.shape[-1]
    small = F.interpolate(images, size=size // 2, mode="bicubic", antialias=True, align_corners=False)
    return F.interpolate(small, size=size, mode="bicubic", align_corners=False).clamp(-1, 1)


def verdict(mean_psnr, min_psnr):
    return next((zh, en) for margin, zh, en in VERDICTS if mean_psnr >= min_psnr + margin)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Check a trained VAE on held-out images: PSNR / SSIM / LPIPS, latent scale, verdict.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--vae_path", default=str(default_vae_output_dir() / "final_model"), help="stage-1 final_model folder")
    p.add_argument("--data_dir", help="dataset folder (default: the one recorded in the model's manifest)")
    p.add_argument("--split", choices=["test", "val", "train"], default="test", help="split of the stored manifest")
    p.add_argument("--num_samples", type=int, default=0, help="images to check, spread over users (0 = the whole split)")
    p.add_argument("--min_psnr", type=float, default=25.0, help="exit 1 when the mean PSNR is below this (dB)")
    p.add_argument("--output_dir", help="where vae_check.json and the grid go (default: beside the model, vae_check/)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--seed", type=int, default=0, help="seed of the posterior samples used for the latent statistics")
    add_split_arguments(p, new_split=False)
    return p.parse_args(argv)


def main(args):
    vae_path = Path(args.vae_path)
    vae, manifest = trained_vae(vae_path, args.manifest)
    data_dir = check_data_dir(args.data_dir or manifest.data_dir)
    manifest.check_matches(data_dir)
    device = resolve_device(args.device)
    resolution = vae.config.sample_size
    dataset = SpectrogramDataset(data_dir, manifest, args.split, resolution)
    if len(dataset) == 0:
        raise UsageError(f"the {args.split} split of the manifest stored with {vae_path} is empty")
    indices = list(range(len(dataset)))
    if args.num_samples:
        indices = indices[:: max(1, len(indices) // args.num_samples)][: args.num_samples]
    try:
        perceptual = load_lpips().to(device)
    except LpipsUnavailable as error:
        perceptual = None
        print(f"LPIPS skipped: {error}", file=sys.stderr)
    output_dir = Path(args.output_dir) if args.output_dir else vae_path.parent / "vae_check"

    vae.to(device)
    generator = torch.Generator().manual_seed(args.seed)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=args.batch_size)
    per_image = {"psnr": [], "bicubic_psnr": [], "ssim": [], "lpips": []}
    users, latents, shown = [], [], []
    with torch.no_grad():
        for batch in tqdm(loader, desc=f"checking {args.split}"):
            originals = batch["pixel_values"].to(device)
            posterior = vae.encode(originals).latent_dist
            reconstructions = vae.decode(posterior.mode()).sample.clamp(-1, 1)
            per_image["psnr"].append(psnr(reconstructions, originals).cpu())
            per_image["bicubic_psnr"].append(psnr(bicubic_round_trip(originals), originals).cpu())
            per_image["ssim"].append(ssim(reconstructions, originals).cpu())
            if perceptual is not None:
                per_image["lpips"].append(perceptual(reconstructions, originals).flatten().cpu())
            noise = torch.randn(posterior.mean.shape, generator=generator).to(device)
            latents.append((posterior.mean + posterior.std * noise).cpu())
            users.extend(batch["user_index"].tolist())
            shown.extend(list(zip(originals.cpu(), reconstructions.cpu()))[: 8 - len(shown)])
    scores = {k: torch.cat(v) for k, v in per_image.items() if v}
    users = torch.tensor(users)
    latents = torch.cat(latents)

    report = {"vae_path": str(vae_path), "data_dir": str(data_dir), "split": args.split, "num_images": len(indices),
              "resolution": resolution}
    for name, values in scores.items():
        per_user = {manifest.users[u]: values[users == u].mean().item() for u in users.unique().tolist()}
        worst = min(per_user, key=per_user.get) if name != "lpips" else max(per_user, key=per_user.get)
        report[name] = {"mean": values.mean().item(), "worst_user": worst, "worst_user_mean": per_user[worst], "per_user": per_user}
    measured_std = latents.std().item()
    stored = vae.config.scaling_factor
    report["latents"] = {
        "mean": latents.mean().item(),
        "std": measured_std,
        "stored_scaling_factor": stored,
        "implied_scaling_factor": 1.0 / measured_std,
        "scaling_factor_matches": abs(stored * measured_std - 1.0) < 0.1,
    }
    mean_psnr = report["psnr"]["mean"]
    zh, en = verdict(mean_psnr, args.min_psnr)
    report["verdict"] = {"zh": zh, "en": en, "min_psnr": args.min_psnr, "passed": mean_psnr >= args.min_psnr}

    write_json_report(output_dir, report, shown)
    print(f"VAE check on {len(indices)} {args.split} images at {resolution}x{resolution} ({vae_path})")
    report["psnr_over_bicubic_db"] = report["psnr"]["mean"] - report["bicubic_psnr"]["mean"]
    for name, unit in (("psnr", " dB"), ("bicubic_psnr", " dB"), ("ssim", ""), ("lpips", "")):
        if name in report:
            r = report[name]
            label = "PSNR of a 2x bicubic round trip (reference)" if name == "bicubic_psnr" else name.upper()
            print(f"  {label:5s} mean {r['mean']:.4f}{unit}   worst user {r['worst_user']}: {r['worst_user_mean']:.4f}{unit}")
    print(f"  VAE PSNR - reference: {report['psnr_over_bicubic_db']:+.2f} dB")
    lat = report["latents"]
    match = "matches" if lat["scaling_factor_matches"] else "DOES NOT match"
    print(f"  latents: mean {lat['mean']:.4f}, std {lat['std']:.4f} -> 1/std {lat['implied_scaling_factor']:.4f}; "
          f"stored scaling_factor {stored:.4f} {match}")
    print(f"  verdict: {zh} / {en} (mean PSNR {mean_psnr:.2f} dB vs --min_psnr {args.min_psnr})")
    print(f"  wrote {output_dir / 'vae_check.json'} and {output_dir / 'vae_check.png'}")
    return 0 if mean_psnr >= args.min_psnr else 1


def write_json_report(output_dir, report, shown):
    write_json(output_dir / "vae_check.json", report)
    rows = [[to_pil(o) for o, _ in shown], [to_pil(r) for _, r in shown]]
    with atomic_path(output_dir / "vae_check.png") as tmp:
        labelled_grid(rows, ["original", "reconstruction"]).save(tmp, format="PNG")


if __name__ == "__main__":
    run(main, parse_args())
