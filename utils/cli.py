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
