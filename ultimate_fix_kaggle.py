"""Environment doctor for Kaggle notebooks and lab machines: report, check, and (only when
asked) install what this project needs. It never uninstalls anything (utils/doctor.py).

    !python ultimate_fix_kaggle.py               # report; exit 0 healthy, 1 problems found
    !python ultimate_fix_kaggle.py --fix         # also print the pip commands that would fix them
    !python ultimate_fix_kaggle.py --fix --yes   # and run those commands

It reports Python, the GPU and CUDA, and the versions of the stack; checks the known
incompatibilities; warns (without failing) when the LPIPS backbone weights are absent;
then imports the stack and runs a tiny VAE and UNet forward pass.
"""

import argparse
import sys

from utils.doctor import diagnose


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Check (and optionally repair) the Python environment for this project.")
    p.add_argument("--fix", action="store_true", help="print the pip commands that would fix the problems found")
    p.add_argument("--yes", action="store_true", help="with --fix: run those commands")
    p.add_argument("--skip_smoke_test", action="store_true", help="do not import the stack or run the tiny forward pass")
    return p.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    sys.exit(diagnose(arguments.fix, arguments.yes, arguments.skip_smoke_test))
