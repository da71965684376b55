"""The person-ID classifier used to evaluate generated images, and its training loop.

A plain convolutional network (`SpectrogramCNN`: per stage 3x3 convolution, 2x2 max-pool,
BatchNorm, ReLU; then global average pooling and a linear layer), trained from
scratch: no pretrained download. Its first convolution sees the full resolution, where the
fine Doppler detail that tells people apart lives, and it learned more identity per CPU
second than a ResNet whose stem quarters the image first (docs/experiments.md). A saved
classifier is a folder: config.json (users, widths, depths, layer order), model.safetensors, the
dataset manifest whose split it was trained on, and training.json.

Real and generated images go through one path: `load_image_folder` / `load_split`
decode, convert to RGB and resize (PIL bicubic, antialiased), kept as uint8 in memory;
`resize` brings such arrays to the classifier's resolution with the same filter (the
evaluation loads everything at the generated images' resolution first); `to_model_input`
maps them to [-1, 1] exactly as the diffusion stages see them.
"""

import copy
import json
import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from utils.cli import UsageError
from utils.data_loader import MANIFEST_NAME, DatasetManifest, is_image_file, load_rgb, natural_key, pil_to_array
from utils.files import atomic_folder
from utils.augment import classic_augmentation, roll_time
from utils.training import adamw, computes_bf16, user_weights

CONFIG_NAME = "config.json"
TRAINING_INFO = "training.json"
WEIGHTS_NAME = "model.safetensors"


def image_array(path, resolution):
    """One image file as a (3, R, R) uint8 tensor, resized with the data loader's filter."""
    return pil_to_array(load_rgb(path), resolution)


def resize(images_uint8, resolution):
    """(N, 3, R, R) uint8 images at another side length, through the same PIL resize."""
    from PIL import Image

    if images_uint8.shape[-1] == resolution:
        return images_uint8
    if len(images_uint8) == 0:
        return torch.zeros(0, 3, resolution, resolution, dtype=torch.uint8)
    return torch.stack([pil_to_array(Image.fromarray(image.permute(1, 2, 0).numpy()), resolution)
                        for image in images_uint8])


def to_model_input(images_uint8):
    """(B, 3, R, R) uint8 -> float in [-1, 1], the range every stage works in."""
    return images_uint8.float() / 127.5 - 1.0


def stack(paths, labels, resolution):
    if not paths:
        return torch.zeros(0, 3, resolution, resolution, dtype=torch.uint8), torch.zeros(0, dtype=torch.long)
    # PIL releases the GIL while it decodes and resizes: threads use every core.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        images = list(tqdm(pool.map(lambda path: image_array(path, resolution), paths), total=len(paths),
                           desc="loading images", unit="img", leave=False, disable=len(paths) < 500))
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


def load_split(data_dir, manifest, split, resolution):
    """(images uint8 (N, 3, R, R), labels (N,)) of one split of the manifest."""
    samples, root = manifest.samples(split), manifest.root(split, data_dir)
    return stack([root / relative for relative, _ in samples], [label for _, label in samples], resolution)


def load_image_folder(folder, manifest, resolution, flag="--generated_dir"):
    """Images of a folder in the dataset layout (FOLDER/<user>/*.png), labelled by the
    manifest's label map. Returns (images, labels, relative paths)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"{flag} {folder} is not a folder")
    user_dirs = sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
                       key=lambda p: natural_key(p.name))
    unknown = [p.name for p in user_dirs if p.name not in manifest.label_map and any(map(is_image_file, p.iterdir()))]
    if unknown:
        raise UsageError(f"{flag} {folder} has users the dataset does not know: {' '.join(unknown)}; "
                         f"valid users: {' '.join(manifest.users)}")
    paths, labels = [], []
    for user_dir in user_dirs:
        for path in sorted(filter(is_image_file, user_dir.iterdir()), key=lambda p: natural_key(p.name)):
            paths.append(path)
            labels.append(manifest.label_map[user_dir.name])
    if not paths:
        raise UsageError(f"{flag} {folder} holds no images in user folders (expected {folder}/<user>/*.png)")
    images, labels = stack(paths, labels, resolution)
    return images, labels, [str(p.relative_to(folder)) for p in paths]


class SpectrogramCNN(torch.nn.Module):
    """Stages of `depth` 3x3 convolutions, each followed by BatchNorm and ReLU, with a 2x2
    max-pool after each stage's last convolution, before its BatchNorm (`pool_before_norm`:
    a quarter of the normalisation work, 1.35x the steps/s on a 2-core CPU and +2.1 points on
    real test, docs/experiments.md; False builds classifiers saved before, which pooled
    after the ReLU); global average pooling; a linear layer over the users. Inputs
    (B, 3, R, R) in [-1, 1], R at least 2^stages."""

    def __init__(self, users, widths, depths, pool_before_norm=True):
        super().__init__()
        self.config = {"users": list(users), "widths": list(widths), "depths": list(depths),
                       "pool_before_norm": pool_before_norm}
        layers, channels = [], 3
        for width, depth in zip(widths, depths):
            for index in range(depth):
                layers.append(torch.nn.Conv2d(channels, width, 3, padding=1, bias=False))
                if pool_before_norm and index == depth - 1:
                    layers.append(torch.nn.MaxPool2d(2))
                layers += [torch.nn.BatchNorm2d(width), torch.nn.ReLU(inplace=True)]
                channels = width
            if not pool_before_norm:
                layers.append(torch.nn.MaxPool2d(2))
        self.features = torch.nn.Sequential(*layers)
        self.head = torch.nn.Linear(channels, len(users))

    def embed(self, images):
        return self.features(images).mean(dim=(2, 3))  # (B, C): the space distances are measured in

    def forward(self, images):
        return self.head(self.embed(images))  # (B, users) logits


def build_classifier(users, widths, depths, pool_before_norm=True):
    return SpectrogramCNN(users, widths, depths, pool_before_norm)


@torch.no_grad()
def predict(model, images_uint8, batch_size=256):
    """Logits (N, users) and pooled features (N, C) of uint8 images, in eval mode."""
    # One layout for every model (trained here, in a worker, or reloaded): one kernel path, one answer.
    model.eval().to(memory_format=torch.channels_last)
    device = next(model.parameters()).device
    logits, features = [], []
    for start in range(0, len(images_uint8), batch_size):
        x = to_model_input(images_uint8[start:start + batch_size].to(device)).to(memory_format=torch.channels_last)
        pooled = model.embed(x)  # (B, C)
        features.append(pooled.float().cpu())
        logits.append(model.head(pooled).float().cpu())
    if not logits:
        return torch.zeros(0, len(model.config["users"])), torch.zeros(0, model.config["widths"][-1])
    return torch.cat(logits), torch.cat(features)


def accuracy(model, images_uint8, labels):
    if len(labels) == 0:
        return float("nan")
    logits, _ = predict(model, images_uint8)
    return (logits.argmax(1) == labels).float().mean().item()


def balanced(predicted, labels):
    """Balanced accuracy: the mean over the users present of each user's accuracy, so a user
    with many test images counts as much as one with few."""
    return torch.stack([(predicted[labels == user] == user).float().mean() for user in labels.unique()]).mean().item()


def accuracies(model, images_uint8, labels):
    """(accuracy, balanced accuracy) from one prediction pass."""
    if len(labels) == 0:
        return float("nan"), float("nan")
    predicted = predict(model, images_uint8)[0].argmax(1)
    return (predicted == labels).float().mean().item(), balanced(predicted, labels)


def same_user_partners(pools, batch_labels, generator):
    """For each image of a batch, a random image index of the same user; `pools[u]` holds
    the indices of user u's images (built once per training, not per step)."""
    partners = torch.empty_like(batch_labels)
    for position, label in enumerate(batch_labels.tolist()):
        pool = pools[label]
        partners[position] = pool[torch.randint(len(pool), (1,), generator=generator)]
    return partners


PRECISIONS = ("auto", "no", "bf16")


def resolve_precision(choice, device):
    """The classifier's training precision: `auto` is bf16 autocast where the device computes
    bf16 natively (a CPU with AMX or AVX512-BF16, a GPU with bf16), else full precision."""
    if choice == "auto":
        return "bf16" if computes_bf16(cpu=torch.device(device).type == "cpu") else "no"
    return choice


def train_classifier(train, val, users, settings, seed, device="cpu", desc="classifier", progress=True,
                     augmentation=None):
    """Train from scratch on `train` = (uint8 images, labels); keep the weights with the
    best accuracy on `val` (evaluated every `eval_every` steps), stop after `patience`
    evaluations without improvement. With `settings["balance_users"]` batches draw every user
    equally often instead of every image once per epoch. Every batch is shifted circularly in time; with
    `augmentation` (utils.augment.classic_augmentation's settings) it is also mixed within
    users and masked. `settings["mixed_precision"]` ("no" when absent) runs the forward
    pass under bf16 autocast; predictions stay in full precision. Returns (model on device,
    history dict)."""
    images, labels = train
    if len(images) == 0:
        raise UsageError(f"{desc}: no training images")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    # Channels-last: the layout oneDNN and tensor cores prefer (faster steps, docs/experiments.md).
    model = build_classifier(users, settings["widths"], settings["depths"]).to(device).to(memory_format=torch.channels_last)
    optimizer = adamw(model.parameters(), lr=settings["learning_rate"], weight_decay=settings["weight_decay"])
    max_steps, warmup = settings["max_train_steps"], max(1, settings["max_train_steps"] // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # linear warmup, cosine decay
        optimizer, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s / max_steps, 1.0)))))
    batch_size = min(settings["batch_size"], len(images))
    best = {"val_accuracy": -1.0, "step": 0, "state": None}
    history, waited, order = [], 0, torch.zeros(0, dtype=torch.long)
    pools = {int(u): (labels == u).nonzero().flatten() for u in labels.unique()} if augmentation else None
    # balance_users: every user drawn equally often, whatever their image counts (with replacement).
    weights = user_weights(labels) if settings.get("balance_users") else None
    bf16 = resolve_precision(settings.get("mixed_precision", "no"), device) == "bf16"
    bar = tqdm(range(1, max_steps + 1), desc=desc, leave=False, disable=not progress)
    for step in bar:
        model.train()
        if len(order) < batch_size:  # a fresh permutation per epoch; the last partial batch is dropped
            order = (torch.randperm(len(images), generator=generator) if weights is None else
                     torch.multinomial(weights, len(images), replacement=True, generator=generator))
        index, order = order[:batch_size], order[batch_size:]
        x = roll_time(to_model_input(images[index]), generator)
        if augmentation:
            partners = roll_time(to_model_input(images[same_user_partners(pools, labels[index], generator)]), generator)
            x = classic_augmentation(x, partners, augmentation, generator)
        x = x.to(device, memory_format=torch.channels_last)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x).float(), labels[index].to(device), label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % settings["eval_every"] == 0 or step == max_steps:
            val_accuracy = accuracy(model, *val) if len(val[1]) else 0.0
            history.append({"step": step, "loss": loss.item(), "val_accuracy": val_accuracy})
            bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{val_accuracy:.3f}")
            if val_accuracy > best["val_accuracy"]:
                best = {"val_accuracy": val_accuracy, "step": step, "state": copy.deepcopy(model.state_dict())}
                waited = 0
            else:
                waited += 1
                if waited >= settings["patience"]:
                    break
    bar.close()
    model.load_state_dict(best["state"])
    return model.eval(), {"best_step": best["step"], "best_val_accuracy": best["val_accuracy"],
                          "steps_run": history[-1]["step"], "history": history}


@dataclass
class Job:
    """One classifier to train: data as (uint8 images, labels), its seed, a description, the
    classic augmentation's settings or None, and its steps (None: the settings')."""

    train: tuple
    val: tuple
    seed: int
    desc: str
    augmentation: dict = None
    max_train_steps: int = None

    def steps(self, settings):
        """The steps it trains for: its own, else the settings'."""
        return self.max_train_steps or settings["max_train_steps"]


def _train_job(job, users, settings, device="cpu", progress=True):
    steps = job.steps(settings)
    model, _ = train_classifier(job.train, job.val, users, {**settings, "max_train_steps": steps}, job.seed, device,
                                desc=job.desc, progress=progress, augmentation=job.augmentation)
    return model


def _train_in_worker(job, users, settings):
    model = _train_job(job, users, settings, progress=False)
    return {name: tensor.contiguous() for name, tensor in model.state_dict().items()}


def train_classifiers(jobs, users, settings, device="cpu", processes=None):
    """Trained models for independent `Job`s, in order.

    On a CPU they train side by side, one process of one thread per core: these small
    convolutions use two threads poorly (docs/experiments.md). A process takes seconds to
    start (imports), so by default (`processes=None`) only jobs of 2000 steps or more in all
    are spread. On a GPU, one after another."""
    steps = sum(job.steps(settings) for job in jobs)
    if torch.device(device).type != "cpu":
        processes = 1
    elif processes is None:
        processes = torch.get_num_threads() if steps >= 2000 else 1
    processes = min(len(jobs), processes)
    if processes <= 1:
        return [_train_job(job, users, settings, device) for job in jobs]
    # spawn, not fork: a forked copy of a process whose thread pools already ran can hang.
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                             initializer=torch.set_num_threads, initargs=(1,)) as pool:
        # Longest first: the short jobs then fill the gaps, and no long one runs alone at the end.
        order = sorted(range(len(jobs)), key=lambda i: -jobs[i].steps(settings))
        futures = {i: pool.submit(_train_in_worker, jobs[i], users, settings) for i in order}
        bar = tqdm(total=len(jobs), desc=f"classifiers ({processes} processes)", leave=False)
        for future in futures.values():
            future.add_done_callback(lambda _: bar.update(1))
        states = [futures[i].result() for i in range(len(jobs))]
        bar.close()
    models = []
    for state in states:
        model = build_classifier(users, settings["widths"], settings["depths"])
        model.load_state_dict(state)
        models.append(model.to(device).eval())
    return models


def save_classifier(model, folder, manifest, info):
    """FOLDER/{config.json, model.safetensors, dataset_manifest.json, training.json}, atomically."""
    from safetensors.torch import save_file

    with atomic_folder(folder) as partial:
        (partial / CONFIG_NAME).write_text(json.dumps(model.config, indent=2, ensure_ascii=False))
        save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()}, str(partial / WEIGHTS_NAME))
        manifest.save(partial / MANIFEST_NAME)
        (partial / TRAINING_INFO).write_text(json.dumps(info, indent=2, ensure_ascii=False, default=str))


def load_classifier(folder, flag="--classifier_path"):
    """(model in eval mode, its dataset manifest, its resolution) from a saved folder."""
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in (CONFIG_NAME, WEIGHTS_NAME, MANIFEST_NAME, TRAINING_INFO):
        if not (folder / name).is_file():
            raise UsageError(f"{flag} {folder} is not a classifier folder: {name} is missing "
                             "(make one with training/train_classifier.py)")
    manifest = DatasetManifest.load(folder / MANIFEST_NAME)
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
        # Classifiers saved before the pool moved ahead of BatchNorm have no such key.
        model = build_classifier(config["users"], config["widths"], config["depths"],
                                 config.get("pool_before_norm", False))
        model.load_state_dict(load_file(str(folder / WEIGHTS_NAME)))
    except (KeyError, ValueError, RuntimeError, OSError) as error:
        raise UsageError(f"{flag} {folder}: cannot load the classifier ({str(error).splitlines()[0]})") from None
    if model.config["users"] != manifest.users:
        raise UsageError(f"{flag} {folder}: the model's label map disagrees with its dataset manifest")
    resolution = json.loads((folder / TRAINING_INFO).read_text())["resolution"]
    return model.eval(), manifest, resolution
