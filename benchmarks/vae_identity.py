"""Does a user's identity survive the VAE? (stage-1 target: >= 90% of the accuracy kept)

    python benchmarks/vae_identity.py --vae_path outputs/vae/final_model --data_dir data/simulated

Trains a small person-ID CNN on the real train split of the model's manifest, then prints
its accuracy on the real test images and on their VAE reconstructions (posterior mode).
A stand-in until the evaluation stage brings the reference classifier; numbers vary by a
few points between seeds.
"""

import argparse
import json
import sys
import time
from pathlib import Path

if not __package__:  # run as `python benchmarks/vae_identity.py`: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from utils.cli import UsageError, run
from utils.data_loader import SpectrogramDataset, check_data_dir
from utils.vae import load_vae, load_vae_manifest, reconstruct


def small_cnn(num_users):
    def block(channels_in, channels_out):
        return nn.Sequential(
            nn.Conv2d(channels_in, channels_out, 3, padding=1), nn.BatchNorm2d(channels_out), nn.ReLU(), nn.MaxPool2d(2)
        )

    return nn.Sequential(
        block(3, 32), block(32, 64), block(64, 128), block(128, 128),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.3), nn.Linear(128, num_users),
    )


def load_split(data_dir, manifest, split, resolution):
    dataset = SpectrogramDataset(data_dir, manifest, split, resolution)
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([i["pixel_values"] for i in items]), torch.tensor([i["user_index"] for i in items])


def train_classifier(images, labels, num_users, epochs, batch_size=64):
    net = small_cnn(num_users)
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * max(1, len(images) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    net.train()
    for _ in tqdm(range(epochs), desc="classifier epochs"):
        order = torch.randperm(len(images))
        for start in range(0, len(images) - batch_size + 1, batch_size):
            index = order[start:start + batch_size]
            # A walk recorded a little earlier or later: roll along time, never flip Doppler.
            batch = torch.roll(images[index], int(torch.randint(0, images.shape[-1], (1,))), dims=-1)
            loss = nn.functional.cross_entropy(net(batch), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return net.eval()


@torch.no_grad()
def accuracy(net, images, labels):
    predictions = torch.cat([net(images[i:i + 256]).argmax(1) for i in range(0, len(images), 256)])
    return (predictions == labels).float().mean().item()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Person-ID accuracy on real test images vs their VAE reconstructions.")
    p.add_argument("--vae_path", required=True, help="stage-1 final_model folder (with its dataset manifest)")
    p.add_argument("--data_dir", help="dataset folder (default: the one recorded in the manifest)")
    p.add_argument("--epochs", type=int, default=15, help="classifier epochs (default 15)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the numbers as JSON here")
    return p.parse_args(argv)


def main(args):
    if args.epochs < 1:
        raise UsageError("--epochs must be at least 1")
    vae_path = Path(args.vae_path)
    manifest = load_vae_manifest(vae_path)
    vae = load_vae(vae_path)
    data_dir = check_data_dir(args.data_dir or manifest.data_dir)
    torch.manual_seed(args.seed)
    resolution = vae.config.sample_size
    train_images, train_labels = load_split(data_dir, manifest, "train", resolution)
    test_images, test_labels = load_split(data_dir, manifest, "test", resolution)
    started = time.perf_counter()
    with torch.no_grad():
        reconstructions = torch.cat([reconstruct(vae, test_images[i:i + 64]) for i in range(0, len(test_images), 64)])
    net = train_classifier(train_images, train_labels, manifest.num_users, args.epochs)
    real, reconstructed = accuracy(net, test_images, test_labels), accuracy(net, reconstructions, test_labels)
    result = {
        "vae_path": str(vae_path), "num_users": manifest.num_users, "test_images": len(test_images),
        "epochs": args.epochs, "seed": args.seed, "real_test_accuracy": real,
        "reconstruction_accuracy": reconstructed, "kept": reconstructed / real if real else 0.0,
        "seconds": time.perf_counter() - started,
    }
    print(f"person-ID accuracy, {manifest.num_users} users, {len(test_images)} test images: real {real:.3f}, "
          f"VAE reconstructions {reconstructed:.3f} -> {result['kept']:.1%} kept (target >= 90%)")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    run(main, parse_args())
