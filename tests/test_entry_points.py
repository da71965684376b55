"""Every entry script answers --help both as a file (`python training/x.py`, the form
users know) and as a module (`python -m training.x`)."""

import pytest

from conftest import REPO_ROOT, run_cli

ENTRY_FOLDERS = ("training", "inference", "benchmarks")
SCRIPTS = sorted(
    path.relative_to(REPO_ROOT)
    for folder in ENTRY_FOLDERS
    for path in (REPO_ROOT / folder).glob("*.py")
    if not path.name.startswith("_")
)
MODULES = ["utils.data_loader", "utils.gait_simulator"]


@pytest.mark.parametrize("script", SCRIPTS, ids=str)
def test_script_runs_as_file_and_as_module(script):
    as_file = run_cli(script, "--help")
    assert as_file.returncode == 0, as_file.stderr
    module = ".".join(script.with_suffix("").parts)
    as_module = run_cli("-m", module, "--help")
    assert as_module.returncode == 0, as_module.stderr
    assert as_file.stdout.split("\n", 1)[1] == as_module.stdout.split("\n", 1)[1]


@pytest.mark.parametrize("module", MODULES)
def test_module_help(module):
    result = run_cli("-m", module, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:")


TOP_LEVEL = ["run_pipeline.py", "check_vae.py", "train_celeba_standard.py", "install_lpips.py", "ultimate_fix_kaggle.py"]
MODULE_FILES = ["utils/data_loader.py", "utils/gait_simulator.py"]


class Captured(Exception):
    pass


def script_parser(path):
    """The argparse parser a script's parse_args builds, caught before it parses anything."""
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"entry_{path.stem}", REPO_ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def capture(self, *args, **kwargs):
        raise Captured(self)

    originals = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args
    argparse.ArgumentParser.parse_args = argparse.ArgumentParser.parse_known_args = capture
    try:
        module.parse_args([])
    except Captured as caught:
        return caught.args[0]
    finally:
        argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args = originals
    return None  # a script without flags


def impossible(rule):
    """A value each rule rules out."""
    from utils.cli import admits

    for value in (0, -1, 1.5, 200):
        if not admits(rule, value):
            return value
    raise AssertionError(rule)


NUMERIC_FLAGS = [
    (str(path), action.dest)
    for path in [*SCRIPTS, *map(__import__("pathlib").Path, TOP_LEVEL + MODULE_FILES)]
    if (parser := script_parser(path)) is not None
    for action in parser._actions if action.type in (int, float)
]


@pytest.mark.parametrize("script,flag", NUMERIC_FLAGS, ids=lambda v: str(v))
def test_every_numeric_flag_rejects_an_impossible_value(script, flag):
    import argparse

    from utils.cli import NUMBER_RULES, UsageError, check_numbers

    assert flag in NUMBER_RULES, f"{script} --{flag} has no rule in utils.cli.NUMBER_RULES"
    value = impossible(NUMBER_RULES[flag])
    with pytest.raises(UsageError, match=f"--{flag} must be "):
        check_numbers(argparse.Namespace(**{flag: value}))


@pytest.mark.parametrize("command", [
    ("training/train_vae.py", "--data_dir", "d", "--output_dir", "{out}", "--learning_rate", "-1"),
    ("training/train_diffusion.py", "--vae_path", "v", "--data_dir", "d", "--output_dir", "{out}", "--batch_size", "0"),
    ("inference/generate.py", "--model_path", "m", "--output_dir", "{out}", "--guidance_scale", "-2"),
    ("run_pipeline.py", "--output_dir", "{out}", "--images_to_generate", "0"),
])
def test_an_impossible_number_is_one_line_and_exit_2(command, tmp_path):
    out = tmp_path / "out"
    result = run_cli(*[str(out) if part == "{out}" else part for part in command])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and " must be " in result.stderr
    assert not out.exists()
