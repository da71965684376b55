"""Named presets for every stage, in one registry.

A preset fills only the flags the user left unset: every preset-controlled flag has
`default=None` in its parser, `resolve_preset` fills the Nones from the preset and then
from `BASE`, and the result is written to the run folder's config.json.

    tiny      tests and smoke runs: a few thousand parameters, seconds on a CPU
    quick     a 2-core CPU: 64x64 images, minutes
    standard  the original project's scale: 256x256 -> 32x32x4 latents, a 16 GB GPU
"""

PRESETS = {
    "tiny": {
        "vae": dict(
            resolution=32, block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
            batch_size=4, learning_rate=1e-3, max_train_steps=4, warmup_steps=1, perceptual_weight=0.0,
            checkpointing_steps=2, validation_steps=2, num_validation_images=4, latent_stats_images=16,
        ),
        "diffusion": dict(
            block_out_channels=(16, 32), layers_per_block=1, attention_head_dim=4, norm_num_groups=8,
            cross_attention_dim=16, num_condition_tokens=2, batch_size=4, learning_rate=1e-3, max_train_steps=4,
            warmup_steps=1, checkpointing_steps=2, validation_steps=2, validation_users=2, validation_seeds=2,
            num_inference_steps=4,
        ),
        # At 16x16 on the tiny 32x32 images, so the tests go through the classifiers' resize.
        "classifier": dict(
            resolution=16, widths=(8, 16, 16, 32), depths=(1, 1, 1, 1), batch_size=16, learning_rate=3e-3,
            weight_decay=5e-4, max_train_steps=20, eval_every=10, patience=3,
        ),
        "evaluation": dict(budgets=(2, "all"), num_seeds=1, gain_seeds=2),
        # run_pipeline.py: the built-in dataset it simulates, images generated per user, the VAE gate.
        "pipeline": dict(num_users=3, images_per_user=12, resolution=32, images_to_generate=4, min_psnr=0.0),
    },
    "quick": {
        # Measured on the simulated 31-user set, 2-core CPU, 600 steps (~9 min), test split:
        #   latent 8,  freq 0.1:  PSNR 21.50 dB (+1.73 over a 2x bicubic round trip), identity kept 75.1%
        #   + patch discriminator (0.5 from step 200): 21.44 dB, 74.4%, and 30% slower steps
        #   latent 16, freq 0.1:  21.97 dB (+2.20), 78.4%
        #   latent 16, freq 1.0:  22.33 dB (+2.57), 91.0%  <- the spectrum term restores the speckle texture
        #                         (84.3% with classifier seed 1 instead of 0)
        # (MSE beat L1 by 1.5 dB.) 450 steps instead: 21.27 dB (+1.50), below the target.
        # bf16 autocast on a CPU with bf16 units (AMX here): 21.89 dB (+2.12) in 7.5 min instead of
        # 10, so the preset asks for `auto` precision (full precision where bf16 would be emulated).
        "vae": dict(
            resolution=64, block_out_channels=(32, 64, 128), layers_per_block=1, latent_channels=16, norm_num_groups=32,
            pixel_loss="mse", freq_weight=1.0, batch_size=16, learning_rate=2e-3, max_train_steps=600, warmup_steps=100,
            checkpointing_steps=200, validation_steps=200, num_validation_images=8, latent_stats_images=2000,
            mixed_precision="auto",
        ),
        # Same VAE and data, 620 generated images (20 per user, guidance 3, bf16), one saved real-train
        # classifier (59.6% on real test): batch 32 x 1000 steps 31.0% in 692 s; batch 16 x 1600 steps
        # 40.2% in 658 s; batch 16 x 2000 steps 49.8% in 799 s. On 2 cores a batch of 16 costs 0.37 s and
        # one of 32 0.6 s, so more, smaller steps learn more per second. (Adding the user's token to the
        # timestep embedding as well as cross-attention: 32.7%, not worth a second conditioning path.)
        "diffusion": dict(
            block_out_channels=(64, 128, 128), layers_per_block=1, attention_head_dim=8, norm_num_groups=32,
            cross_attention_dim=128, num_condition_tokens=4, batch_size=16, learning_rate=1e-3, max_train_steps=1600,
            warmup_steps=100, checkpointing_steps=400, validation_steps=800, validation_users=8, validation_seeds=4,
            num_inference_steps=25,
        ),
        # Real-test accuracy on the simulated set, seed 0, 2-core CPU: the classifier learns the
        # coarse gait pattern first, so 32x32 gives more accuracy per second than 64x64:
        #   64x64: 600 steps 62.3% in 66 s;  32x32: 600 steps 60.9% in 29 s, 1200 steps 67.5% in 49 s
        "classifier": dict(
            resolution=32, widths=(32, 64, 128, 256), depths=(1, 1, 1, 1), batch_size=64, learning_rate=2e-3,
            weight_decay=5e-4, max_train_steps=500, eval_every=50, patience=4,
        ),
        # 3 + 3 + 3 + 2 x 5 classifiers, two at a time on the 2-core CPU (~27 s each): about 6 min with the
        # VAE reconstructions in run_pipeline.py. Gain at 10 per user with 5 paired seeds: +7.1 points,
        # 95% CI [+1.8, +12.3] (the batch-16 diffusion model). On the earlier 1000-step model 5 seeds gave
        # [-2.1, +7.5] and 8 seeds [+1.1, +7.3], for 73-140 s more: `--gain_seeds 8` narrows it when time allows.
        "evaluation": dict(budgets=(10,), num_seeds=3, gain_seeds=5),
        "pipeline": dict(num_users=31, images_per_user=150, resolution=256, images_to_generate=20, min_psnr=20.0),
    },
    "standard": {
        "vae": dict(
            resolution=256, block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
            norm_num_groups=32, batch_size=8, learning_rate=1e-4, num_epochs=50, warmup_steps=500,
            checkpointing_steps=1000, validation_steps=500, num_validation_images=8, latent_stats_images=2000,
        ),
        # The original's scale: sized for a 16 GB GPU at batch 16 in fp16.
        "diffusion": dict(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, attention_head_dim=8, norm_num_groups=32,
            cross_attention_dim=512, num_condition_tokens=4, batch_size=16, learning_rate=1e-4, num_epochs=100,
            warmup_steps=500, checkpointing_steps=1000, validation_steps=1000, validation_users=8, validation_seeds=4,
            num_inference_steps=25,
        ),
        # ResNet-18's shape, from scratch.
        "classifier": dict(
            resolution=256, widths=(64, 128, 256, 512), depths=(2, 2, 2, 2), batch_size=64, learning_rate=1e-3,
            weight_decay=5e-4, max_train_steps=3000, eval_every=200, patience=5,
        ),
        "evaluation": dict(budgets=(5, 10, 20, "all"), num_seeds=3, gain_seeds=5),
        "pipeline": dict(num_users=31, images_per_user=150, resolution=256, images_to_generate=100, min_psnr=25.0),
    },
}

# Values every preset shares unless it says otherwise.
BASE = {
    "vae": dict(
        kl_weight=1e-4, perceptual_weight="auto", freq_weight=0.1, pixel_loss="l1", gradient_accumulation_steps=1,
        disc_weight=0.0, disc_start=0, disc_channels=64, disc_layers=3,
        num_epochs=None, max_train_steps=None, max_grad_norm=1.0, checkpoints_total_limit=3,
        mixed_precision="no", weight_decay=0.0,
    ),
    "diffusion": dict(
        num_train_timesteps=1000, prediction_type="epsilon", snr_gamma=5.0, condition_dropout=0.1,
        gradient_accumulation_steps=1, num_epochs=None, max_train_steps=None, max_grad_norm=1.0, weight_decay=1e-2,
        mixed_precision="no", use_ema=True, ema_decay=0.9999, checkpoints_total_limit=3, guidance_scale=3.0,
    ),
}

PRESET_NAMES = tuple(PRESETS)


def resolve_preset(args, stage):
    """Fill the None attributes of `args` from the preset, then from BASE. Returns the
    names of the flags the preset (or BASE) decided, for the banner and config.json."""
    decided = []
    for source in (PRESETS[args.preset][stage], BASE.get(stage, {})):
        for name, value in source.items():
            if getattr(args, name, None) is None and value is not None:
                setattr(args, name, list(value) if isinstance(value, tuple) else value)
                decided.append(name)
    return decided
