"""The loss terms of both stages against answers worked out by hand."""

import math

import pytest
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from utils.losses import adaptive_weight, diffusion_loss, kl_per_element, log_spectrum, min_snr_weights, vae_losses


def posterior(mean, logvar):
    return DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))


def test_kl_of_a_standard_normal_is_zero_and_of_a_shifted_one_is_half_the_square():
    zeros = torch.zeros(2, 4, 3, 3)
    assert kl_per_element(zeros, zeros).item() == 0.0
    # KL(N(m, 1) || N(0, 1)) = m^2 / 2 per element; KL(N(0, e) || N(0, 1)) = (e - 1 - 1) / 2 per element.
    assert kl_per_element(torch.full_like(zeros, 2.0), zeros).item() == pytest.approx(2.0)
    assert kl_per_element(zeros, torch.ones_like(zeros)).item() == pytest.approx((math.e - 2) / 2)


def test_kl_term_is_diffusers_kl_per_latent_element():
    torch.manual_seed(0)
    mean, logvar = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    dist = posterior(mean, logvar)
    assert kl_per_element(dist.mean, dist.logvar).item() == pytest.approx((dist.kl() / mean[0].numel()).mean().item())


def test_vae_loss_weights_its_terms():
    torch.manual_seed(0)
    originals = torch.rand(2, 3, 8, 8) * 2 - 1
    reconstructions = originals + 0.1
    dist = posterior(torch.full((2, 4, 2, 2), 1.0), torch.zeros(2, 4, 2, 2))  # KL 0.5 per element
    terms = vae_losses(reconstructions, originals, dist, pixel_loss="l1", kl_weight=0.2, freq_weight=0.0)
    assert terms["pixel"].item() == pytest.approx(0.1, rel=1e-5) and terms["kl"].item() == pytest.approx(0.5)
    assert terms["loss"].item() == pytest.approx(0.1 + 0.2 * 0.5, rel=1e-5) and "freq" not in terms
    mse = vae_losses(reconstructions, originals, dist, pixel_loss="mse", kl_weight=0.0, freq_weight=1.0)
    assert mse["pixel"].item() == pytest.approx(0.01, rel=1e-4)
    assert mse["loss"].item() == pytest.approx(mse["pixel"].item() + mse["freq"].item())


def test_log_spectrum_of_a_constant_image_is_its_dc_term_only():
    image = torch.full((1, 1, 4, 4), 0.5)
    spectrum = log_spectrum(image)  # orthonormal: DC = sum / sqrt(pixels) = 8 / 4 = 2
    assert spectrum[0, 0, 0, 0].item() == pytest.approx(math.log1p(2.0))
    assert spectrum.flatten()[1:].abs().max().item() == pytest.approx(0.0, abs=1e-6)


def test_min_snr_weights_for_known_snrs():
    snr = torch.tensor([0.5, 5.0, 20.0])
    # epsilon: min(SNR, 5) / SNR; v: min(SNR, 5) / (SNR + 1)
    assert min_snr_weights(snr, 5.0, "epsilon").tolist() == pytest.approx([1.0, 1.0, 0.25])
    assert min_snr_weights(snr, 5.0, "v_prediction").tolist() == pytest.approx([0.5 / 1.5, 5 / 6, 5 / 21])


def test_min_snr_weights_with_the_training_schedule():
    from diffusers.training_utils import compute_snr

    from utils.diffusion import build_noise_scheduler

    scheduler = build_noise_scheduler(1000, "epsilon")
    timesteps = torch.tensor([0, 500, 999])
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = compute_snr(scheduler, timesteps)
    assert snr.tolist() == pytest.approx((alphas / (1 - alphas)).tolist(), rel=1e-4)
    weights = min_snr_weights(snr, 5.0, "epsilon")
    assert weights[0].item() == pytest.approx(5.0 / snr[0].item(), rel=1e-5)  # low noise: SNR far above 5
    assert weights[2].item() == pytest.approx(1.0)  # pure noise: SNR below 5


def test_diffusion_loss_is_plain_or_weighted_mse():
    prediction, target = torch.zeros(2, 1, 2, 2), torch.stack([torch.ones(1, 2, 2), 2 * torch.ones(1, 2, 2)])
    assert diffusion_loss(prediction, target).item() == pytest.approx((1 + 4) / 2)
    snr = torch.tensor([10.0, 1.0])  # weights 0.5 and 1 at gamma 5
    assert diffusion_loss(prediction, target, snr, 5.0, "epsilon").item() == pytest.approx((0.5 * 1 + 1 * 4) / 2)


def test_adaptive_weight_on_a_hand_made_case():
    # loss = 3 * w and g = -2 * w on a one-element layer: gradients 3 and -2, weight = 3 / (2 + 1e-4) * 0.5.
    layer = torch.nn.Parameter(torch.tensor([1.5]))
    weight = adaptive_weight((3 * layer).sum(), (-2 * layer).sum(), layer, disc_weight=0.5)
    assert weight.item() == pytest.approx(3 / (2 + 1e-4) * 0.5)
    assert not weight.requires_grad
