"""Augmentations that keep a spectrogram physically meaningful. Time runs along the width.
Never a flip of the Doppler (vertical) axis: a mirrored spectrogram is another motion."""

import torch


def roll_time(images, generator=None):
    """Shift each image (B, C, H, W) circularly along time by its own random amount: the
    same walk recorded a little earlier or later. Works on pixels and on latents alike."""
    shifts = torch.randint(0, images.shape[-1], (len(images),), generator=generator)
    columns = (torch.arange(images.shape[-1]) - shifts[:, None]) % images.shape[-1]  # (B, W)
    return torch.gather(images, 3, columns[:, None, None, :].expand_as(images).to(images.device))
