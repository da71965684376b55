"""Named presets for every stage, in one registry, and the resolved configuration.

A preset fills only the flags the user left unset: every preset-controlled flag has
`default=None` in its parser, `resolve_preset` fills the Nones from the preset and then
from `BASE`; each stage then decides its `auto` values once and freezes the result in a
`Config`, which is written to the run folder's config.json.

    tiny      tests and smoke runs: a few thousand parameters, seconds on a CPU
    quick     a 2-core CPU: 64x64 images, minutes
    standard  the original project's scale: 256x256 -> 32x32x4 latents, a 16 GB GPU
"""

# The evaluation's classic spectrogram augmentation (utils.augment.classic_augmentation), on top of
# the circular time shifts every classifier trains with: SpecAugment-style masks, mixup within a user.
# Chosen on the validation split among six settings: every mask cost accuracy there, mild mixup did
# not (docs/experiments.md); the masks stay configurable.
CLASSIC_AUGMENTATION = dict(time_masks=0, time_mask_share=0.1, frequency_masks=0, frequency_mask_share=0.05,
                            mixup_probability=0.2, mixup_alpha=0.4)

PRESETS = {
    "tiny": {
        "vae": dict(
            resolution=32, block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
            batch_size=4, learning_rate=1e-3, max_train_steps=4, warmup_steps=1, perceptual_weight=0.0,
            checkpointing_steps=2, validation_steps=2, num_validation_images=4, latent_stats_images=16,
        ),
        "diffusion": dict(
            block_out_channels=(16, 32), layers_per_block=1, attention_levels=1, attention_head_dim=4,
            norm_num_groups=8, cross_attention_dim=16, num_condition_tokens=2, batch_size=4, learning_rate=1e-3,
            max_train_steps=4, warmup_steps=1, checkpointing_steps=2, validation_steps=2, heldout_steps=2,
            validation_users=2, validation_seeds=2, num_inference_steps=4,
        ),
        # At 16x16 on the tiny 32x32 images, so the tests go through the classifiers' resize.
        "classifier": dict(
            resolution=16, widths=(8, 16, 16, 32), depths=(1, 1, 1, 1), batch_size=16, learning_rate=3e-3,
            weight_decay=5e-4, max_train_steps=20, eval_every=10, patience=3, mixed_precision="no",
        ),
        "evaluation": dict(budgets=("all", 2), num_seeds=1, gain_seeds=2, classic_augmentation=CLASSIC_AUGMENTATION,
                           vae_classifiers=True),
        # run_pipeline.py: the built-in dataset it simulates, images generated per user, the VAE gate.
        "pipeline": dict(num_users=3, images_per_user=12, resolution=32, images_to_generate=4, min_psnr=0.0,
                         strength=1.0),
    },
    "quick": {
        # Spectrum term at weight 1 and 16 latent channels: the speckle texture survives (docs/experiments.md).
        "vae": dict(
            resolution=64, block_out_channels=(32, 64, 128), layers_per_block=1, latent_channels=16, norm_num_groups=32,
            pixel_loss="mse", freq_weight=1.0, batch_size=16, learning_rate=2e-3, max_train_steps=600, warmup_steps=100,
            checkpointing_steps=200, validation_steps=200, num_validation_images=8, latent_stats_images=2000,
            mixed_precision="auto",
        ),
        # Batch 16: on 2 cores more, smaller steps learn more identity per second. Attention only at 4x4 and
        # bf16 where the CPU computes it: 1.5-2.0x the steps/s, so twice the steps fit (docs/experiments.md).
        # Held-out loss every 200 steps (3.6 s each in bf16): every 400 shipped a measurably worse step.
        "diffusion": dict(
            block_out_channels=(64, 128, 128), layers_per_block=1, attention_levels=1, attention_head_dim=8,
            norm_num_groups=32, cross_attention_dim=128, num_condition_tokens=4, batch_size=16, learning_rate=1e-3,
            max_train_steps=3200, warmup_steps=100, checkpointing_steps=800, validation_steps=1600, heldout_steps=200,
            heldout_patience=3, validation_users=8,
            validation_seeds=4, num_inference_steps=25, mixed_precision="auto",
        ),
        # A plain CNN at 32x32: the most identity per CPU second measured; 375 steps of 128 match 250 of 256
        # in accuracy at 0.72x the time (docs/experiments.md). bf16 autocast where the hardware computes it.
        "classifier": dict(
            resolution=32, widths=(32, 64, 128, 256), depths=(1, 1, 1, 1), batch_size=128, learning_rate=4e-3,
            weight_decay=5e-4, max_train_steps=375, eval_every=25, patience=4, mixed_precision="auto",
        ),
        # 5 paired gain seeds (4 rows x 2 budgets): the intervals of docs/experiments.md; the time it takes is there.
        # No classifiers on VAE reconstructions: 2 of the evaluation's 18 minutes (docs/results.md) for a diagnostic;
        # the identity kept through the VAE stays (the reference classifiers on reconstructed test).
        "evaluation": dict(budgets=("all", 10), num_seeds=3, gain_seeds=5, classic_augmentation=CLASSIC_AUGMENTATION,
                           vae_classifiers=False),
        "pipeline": dict(num_users=31, images_per_user=150, resolution=256, images_to_generate=20, min_psnr=20.0,
                         strength=1.0),
    },
    "standard": {
        "vae": dict(
            resolution=256, block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
            norm_num_groups=32, batch_size=8, learning_rate=1e-4, num_epochs=50, warmup_steps=500,
            checkpointing_steps=1000, validation_steps=500, num_validation_images=8, latent_stats_images=2000,
        ),
        # The original's scale: sized for a 16 GB GPU at batch 16 in fp16 (auto: bf16 where the GPU has it).
        # Attention stays on three levels: its cost was measured on a CPU only (docs/experiments.md).
        "diffusion": dict(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, attention_levels=3, attention_head_dim=8,
            norm_num_groups=32, cross_attention_dim=512, num_condition_tokens=4, batch_size=16, learning_rate=1e-4,
            num_epochs=100, warmup_steps=500, checkpointing_steps=1000, validation_steps=1000, heldout_steps=500,
            heldout_patience=4, validation_users=8,
            validation_seeds=4, num_inference_steps=25, mixed_precision="auto",
        ),
        # The quick recipe at 64x64 with two convolutions per stage and 4x the steps, for a GPU
        # (not measured there yet: docs/experiments.md has the CPU measurements it grew from).
        "classifier": dict(
            resolution=64, widths=(32, 64, 128, 256), depths=(2, 2, 2, 2), batch_size=256, learning_rate=4e-3,
            weight_decay=5e-4, max_train_steps=1000, eval_every=50, patience=5, mixed_precision="auto",
        ),
        "evaluation": dict(budgets=("all", 5, 10, 20), num_seeds=3, gain_seeds=5,
                           classic_augmentation=CLASSIC_AUGMENTATION, vae_classifiers=True),
        "pipeline": dict(num_users=31, images_per_user=150, resolution=256, images_to_generate=100, min_psnr=25.0,
                         strength=1.0),
    },
}

# Values every preset shares unless it says otherwise.
BASE = {
    "vae": dict(
        kl_weight=1e-4, perceptual_weight="auto", freq_weight=0.1, pixel_loss="l1", gradient_accumulation_steps=1,
        disc_weight=0.0, disc_start=0, disc_channels=64, disc_layers=3,
        num_epochs=None, max_train_steps=None, max_grad_norm=1.0, checkpoints_total_limit=3,
        mixed_precision="no", weight_decay=0.0, use_augmentation=False, num_workers=0, seed=0, report_to="none",
    ),
    "diffusion": dict(
        num_train_timesteps=1000, prediction_type="epsilon", snr_gamma=5.0, condition_dropout=0.1,
        gradient_accumulation_steps=1, num_epochs=None, max_train_steps=None, max_grad_norm=1.0, weight_decay=1e-2,
        mixed_precision="no", use_ema=True, ema_decay=0.9999, checkpoints_total_limit=3, guidance_scale=3.0,
        use_augmentation=False, seed=0, report_to="none",
        # The user through the timestep embedding too: +8.9 points of identity at equal steps (docs/experiments.md).
        class_embedding=True,
        # ...and scales and shifts their normalised features (FiLM): the held-out loss of 3200 steps in 2400.
        scale_shift=True,
        balance_users=False,  # every image once per epoch; True draws every user equally often
        heldout_patience=0,
    ),
}

PRESET_NAMES = tuple(PRESETS)


def resolve_preset(stage, preset, given):
    """The settings of `stage`: the user's values (`given`, None = unset) over the preset's,
    over BASE. Returns (values, the names the preset or BASE decided)."""
    values, decided = dict(given), []
    for source in (PRESETS[preset][stage], BASE.get(stage, {})):
        for name, value in source.items():
            if values.get(name) is None and value is not None:
                values[name] = list(value) if isinstance(value, tuple) else value
                decided.append(name)
    return values, decided


class Config:
    """A stage's configuration once resolved (flags, preset, BASE, every `auto` decided):
    read by attribute, never changed afterwards, written to the run folder as config.json."""

    def __init__(self, values):
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"no setting {name!r} in this configuration") from None

    def __setattr__(self, name, value):
        raise AttributeError(f"the configuration is read-only once resolved (tried to set {name!r})")

    def __getstate__(self):
        return self._values

    def __setstate__(self, values):
        object.__setattr__(self, "_values", values)

    def pick(self, *names):
        """The named settings as keyword arguments."""
        return {name: self._values[name] for name in names}

    def to_dict(self):
        return dict(self._values)
