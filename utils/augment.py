"""Augmentations that keep a spectrogram physically meaningful. Time runs along the width,
Doppler along the height. Never a flip of the Doppler axis: a mirrored spectrogram is
another motion.
"""

import numpy as np
import torch


def roll_time(images, generator=None):
    """Shift each image (B, C, H, W) circularly along time by its own random amount: the
    same walk recorded a little earlier or later. Works on pixels and on latents alike."""
    shifts = torch.randint(0, images.shape[-1], (len(images),), generator=generator)
    columns = (torch.arange(images.shape[-1]) - shifts[:, None]) % images.shape[-1]  # (B, W)
    return torch.gather(images, 3, columns[:, None, None, :].expand_as(images).to(images.device))


def background_colour(images):
    """Each image's per-channel median (B, C, 1, 1): the colour of its background, where
    a spectrogram holds no echo."""
    return images.flatten(2).median(dim=2).values[..., None, None]


def mask_bands(images, count, max_share, dim, generator=None):
    """SpecAugment-style masking (Park et al., 2019): `count` bands per image along `dim`
    (3: time, 2: Doppler), each of a random width below `max_share` of that axis, filled
    with the image's background colour."""
    if count < 1 or max_share <= 0:
        return images
    size, batch = images.shape[dim], len(images)
    widths = (torch.rand(batch, count, generator=generator) * max_share * size).long()  # (B, count)
    starts = (torch.rand(batch, count, generator=generator) * (size - widths + 1)).long()
    positions = torch.arange(size)
    inside = ((positions >= starts[..., None]) & (positions < (starts + widths)[..., None])).any(1)  # (B, size)
    shape = [batch, 1, 1, 1]
    shape[dim] = size
    return torch.where(inside.view(shape).to(images.device), background_colour(images), images)


def mixup_within_user(images, partners, alpha, probability, generator=None):
    """Blend a share `probability` of the images with `partners` (another image of the
    same user each) by a weight drawn from Beta(alpha, alpha) (Zhang et al., 2018, within
    one class, so the label stays the user's)."""
    if probability <= 0:
        return images
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    weights = torch.from_numpy(np.random.default_rng(seed).beta(alpha, alpha, len(images))).float()
    weights = torch.where(torch.rand(len(images), generator=generator) < probability, weights, torch.ones(len(images)))
    weights = weights.view(-1, 1, 1, 1).to(images.device)
    return weights * images + (1 - weights) * partners


def classic_augmentation(images, partners, settings, generator=None):
    """The classic spectrogram augmentation the evaluation compares generated images with:
    mixup within a user, then time and Doppler masks. `settings` as in the presets'
    `classic_augmentation`; `partners` another image of the same user for each image."""
    images = mixup_within_user(images, partners, settings["mixup_alpha"], settings["mixup_probability"], generator)
    images = mask_bands(images, settings["time_masks"], settings["time_mask_share"], 3, generator)
    return mask_bands(images, settings["frequency_masks"], settings["frequency_mask_share"], 2, generator)
