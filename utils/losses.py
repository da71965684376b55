"""The training losses of both stages, as plain functions of tensors and explicit weights.

Stage 1 (utils.vae): pixel + KL + log-spectrum + LPIPS terms, and a patch-discriminator
hinge GAN with the adaptive weight of Esser et al. (2021). Stage 2 (utils.diffusion):
the denoising MSE, optionally Min-SNR-gamma weighted (Hang et al., 2023).
"""

import torch
import torch.nn.functional as F


def kl_per_element(mean, logvar):
    """KL(N(mean, exp(logvar)) || N(0, 1)) averaged over every latent element, so a KL
    weight means the same at every resolution: 0.5 * (mean^2 + var - 1 - logvar)."""
    return 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1.0 - logvar.float()).mean()


def log_spectrum(images):
    """log(1 + |FFT|) per channel, orthonormal so its scale is resolution-independent
    (an unnormalised spectrum is dominated by its DC term)."""
    return torch.log1p(torch.abs(torch.fft.rfft2(images.float(), norm="ortho")))


def vae_losses(reconstructions, originals, posterior, *, pixel_loss, kl_weight, freq_weight, perceptual=None,
               perceptual_weight=0.0):
    """Each term of the stage-1 loss and their weighted sum under "loss".

    pixel_loss "l1" or "mse", mean per pixel; `posterior` a diffusers
    DiagonalGaussianDistribution; `perceptual` an LPIPS module or None."""
    reconstructions, originals = reconstructions.float(), originals.float()
    pixel = F.l1_loss(reconstructions, originals) if pixel_loss == "l1" else F.mse_loss(reconstructions, originals)
    terms = {"pixel": pixel, "kl": kl_per_element(posterior.mean, posterior.logvar)}
    total = pixel + kl_weight * terms["kl"]
    if freq_weight > 0:
        terms["freq"] = F.l1_loss(log_spectrum(reconstructions), log_spectrum(originals))
        total = total + freq_weight * terms["freq"]
    if perceptual is not None:
        terms["lpips"] = perceptual(reconstructions, originals).mean()
        total = total + perceptual_weight * terms["lpips"]
    terms["loss"] = total
    return terms


def discriminator_hinge_loss(logits_real, logits_fake):
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def adaptive_weight(reconstruction_loss, generator_loss, last_layer, disc_weight):
    """||grad of the reconstruction loss|| / ||grad of the adversarial loss|| at the decoder's
    last layer, times disc_weight (Esser et al., 2021, eq. 7), so the weight means the
    same at any loss scale."""
    grad_reconstruction = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)[0]
    grad_adversarial = torch.autograd.grad(generator_loss, last_layer, retain_graph=True)[0]
    return (grad_reconstruction.norm() / (grad_adversarial.norm() + 1e-4)).clamp(0, 1e4).detach() * disc_weight


def adversarial_terms(discriminator, reconstructions, reconstruction_loss, last_layer, disc_weight):
    """Generator side of the hinge GAN. `discriminator` is the unwrapped module; its
    parameters are frozen here so that only the decoder receives this gradient."""
    discriminator.requires_grad_(False)
    generator_loss = -discriminator(reconstructions).float().mean()
    discriminator.requires_grad_(True)
    weight = adaptive_weight(reconstruction_loss, generator_loss, last_layer, disc_weight)
    return {"g_adv": generator_loss, "adv_weight": weight}


def min_snr_weights(snr, gamma, prediction_type):
    """Per-sample weights min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v prediction
    (Hang et al., 2023, eq. 9 and its v form)."""
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


def diffusion_loss(prediction, target, snr=None, snr_gamma=0.0, prediction_type="epsilon"):
    """Mean squared error per sample, Min-SNR weighted when `snr_gamma` > 0 (`snr` of each
    sample's timestep then required), averaged over the batch."""
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if not snr_gamma:
        return per_sample.mean()
    return (min_snr_weights(snr, snr_gamma, prediction_type) * per_sample).mean()
