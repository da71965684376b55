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
