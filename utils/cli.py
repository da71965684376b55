"""Command-line plumbing shared by every script: readable errors and exit code 2.

Bad input (a missing folder, an unknown user, a malformed file) raises `UsageError`
anywhere below `main`; `run` turns it into one line on stderr and exit code 2, never a
traceback. Anything else is a bug and keeps its traceback.
"""

import argparse
import logging
import os
import sys


def resolve_device(choice):
    """The torch.device for --device auto|cpu|cuda; cuda without a visible GPU is a usage error."""
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA GPU is visible; use --device cpu or auto")
    return torch.device("cuda" if choice != "cpu" and torch.cuda.is_available() else "cpu")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default, except where it is None: a preset or BASE decides those."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


class UsageError(Exception):
    """Input the user can fix: reported as one line on stderr, exit code 2."""


class RunFailed(Exception):
    """A run that cannot go on (e.g. a diverged loss): one line on stderr, exit code 1."""


# What a numeric flag must be, by its name, in every script (the same name means the same
# thing everywhere); `run` checks them before `main`, so an impossible value is one line and
# exit 2. Every numeric flag has an entry (tests/test_entry_points.py checks the parsers).
AT_LEAST_1 = ">= 1"
NUMBER_RULES = {
    **dict.fromkeys((
        "attention_head_dim", "batch_size", "block_out_channels", "checkpointing_steps", "classifier_resolution",
        "cross_attention_dim", "depths", "diffusion_steps", "disc_channels", "disc_layers", "epoch_images", "epochs",
        "eval_every", "gain_seeds", "generation_batch", "generation_images", "goal_images", "gradient_accumulation_steps",
        "grid_images", "grid_users", "images_per_user", "images_to_generate", "latent_channels", "latent_shape",
        "latent_stats_images", "layers_per_block", "max_train_steps", "max_tries_per_image", "norm_num_groups",
        "num_condition_tokens", "num_epochs", "num_images", "num_images_per_user", "num_inference_steps", "num_seeds", "num_train_timesteps", "num_users", "num_validation_images", "patience",
        "resolution", "seeds", "steps", "train_images_per_user", "validation_seeds", "validation_steps",
        "validation_users", "widths", "windows_per_recording", "workers"), AT_LEAST_1),
    **dict.fromkeys((
        "attention_levels", "checkpoints_total_limit", "disc_start", "disc_weight", "freq_weight", "guidance_scale",
        "heldout_patience", "heldout_steps", "identity_strength", "kl_weight", "max_grad_norm", "min_psnr", "num_samples", "num_workers", "seed", "snr_gamma", "split_seed", "warmup",
        "warmup_steps", "weight_decay"), ">= 0"),
    **dict.fromkeys(("carrier_ghz", "duration_s", "dynamic_range_db", "learning_rate", "prf_hz"), "> 0"),
    **dict.fromkeys(("condition_dropout", "ema_decay", "test_fraction", "val_fraction"), "in [0, 1)"),
    "min_confidence": "in [0, 1]",
    "strength": "in (0, 1]",
    "max_aspect_deg": "in [0, 180]",
}


def admits(rule, value):
    """Whether `value` satisfies a rule of NUMBER_RULES (">= 1", "> 0", "in [0, 1)", ...)."""
    if rule.startswith(">="):
        return value >= float(rule[2:])
    if rule.startswith(">"):
        return value > float(rule[1:])
    low, high = (float(bound) for bound in rule[4:-1].split(","))
    return (value >= low if rule[3] == "[" else value > low) and (value <= high if rule[-1] == "]" else value < high)


def check_numbers(args):
    """UsageError for the first numeric flag whose value its rule rules out (`args`: a
    namespace, or parse_known_args' (namespace, rest))."""
    for name, value in vars(args[0] if isinstance(args, tuple) else args).items():
        rule = NUMBER_RULES.get(name)
        for number in value if isinstance(value, (list, tuple)) else [value]:
            if rule and isinstance(number, (int, float)) and not isinstance(number, bool) and not admits(rule, number):
                raise UsageError(f"--{name} must be {rule}, got {number}")


def setup_logging(verbose=False):
    # Warnings and errors only: libraries' INFO chatter (accelerate's checkpoint lines)
    # would bury the progress bar; scripts print their own banners.
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s: %(message)s",
        stream=sys.stderr,
    )


def run(main, args):
    """Call `main(args)`; map `UsageError` to exit 2, Ctrl-C to 130, a closed pipe to 1."""
    setup_logging()
    try:
        check_numbers(args)
        code = main(args)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except RunFailed as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        # The reader went away (`... | head`): silence the flush at exit, as the Python docs advise.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    sys.exit(code or 0)
