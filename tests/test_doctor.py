"""ultimate_fix_kaggle.py (utils/doctor.py): the environment doctor, on this machine and on faked version sets."""

import importlib.metadata

import pytest

from conftest import run_cli
from utils import doctor

HEALTHY = {
    "torch": "2.14.1", "torchvision": "0.29.1", "diffusers": "0.42.1", "transformers": "5.24.0",
    "accelerate": "1.15.0", "huggingface_hub": "2.4.0", "lpips": "0.1.4", "numpy": "2.4.6", "pillow": "13.0.0",
    "safetensors": "0.8.0", "torchmetrics": "1.9.0", "scipy": "1.17.1", "matplotlib": "3.11.2", "tqdm": "4.70.1",
}


def broken(**changes):
    return {**HEALTHY, **changes}


def test_this_machine_is_healthy():
    result = run_cli("ultimate_fix_kaggle.py")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "healthy" in result.stdout and "forward pass on cpu: ok" in result.stdout
    assert f"torch            {importlib.metadata.version('torch')}" in result.stdout


def test_a_healthy_set_has_no_problems():
    assert doctor.check_versions(HEALTHY) == []


@pytest.mark.parametrize("versions, message, fix", [
    (broken(torchvision="0.20.0"), "torchvision 0.20.0 is not built for torch 2.14.1", "torchvision==0.29.*"),
    (broken(torch="2.1.2", torchvision="0.16.2"), "numpy 2.4.6 under torch 2.1.2", "numpy<2"),
    (broken(diffusers="0.28.2", huggingface_hub="0.26.0"), "imports huggingface_hub.cached_download", "diffusers>=0.29"),
    (broken(lpips=None), "lpips is not installed", "lpips>=0.1.4"),
    (broken(accelerate="1.0.1"), "cannot reload its own RNG states under torch 2.14.1", "accelerate>=1.1"),
    (broken(accelerate="0.20.0"), "accelerate 0.20.0 is older than this project needs", "accelerate>=1.1"),
    (broken(pillow="9.0.1"), "pillow 9.0.1 is older than this project needs", "pillow>=9.1"),
])
def test_broken_combinations_are_found_with_their_fix(versions, message, fix):
    problems = doctor.check_versions(versions)
    assert any(message in text for text, _ in problems), problems
    commands = doctor.fix_commands(problems)
    assert len(commands) == 1 and commands[0][1:4] == ["-m", "pip", "install"] and fix in commands[0]
    assert not any("uninstall" in part for part in commands[0])


@pytest.mark.parametrize("versions, package, floor", [
    (broken(diffusers="0.28.2", huggingface_hub="0.26.0"), "diffusers", "0.29.0"),
    (broken(accelerate="1.0.1"), "accelerate", "1.1.0"),
    (broken(pillow="9.0.1"), "pillow", "9.1.0"),
    (broken(torchvision="0.20.0"), "torchvision", "0.29.0"),
])
def test_the_suggested_version_really_fixes_it(versions, package, floor):
    # The lowest version the fix allows leaves no problem: the floors work together.
    assert doctor.check_versions(versions)
    assert doctor.check_versions({**versions, package: floor}) == []


def test_fix_prints_commands_and_exits_1_without_running_them(monkeypatch, capsys):
    monkeypatch.setattr(doctor, "installed_versions", lambda: broken(torch="2.1.2", torchvision="0.15.2"))
    ran = []
    monkeypatch.setattr(doctor, "run_pip", lambda command: ran.append(command) or 0)
    assert doctor.diagnose(fix=True) == 1
    out = capsys.readouterr().out
    assert "PROBLEM: torchvision 0.15.2" in out and "PROBLEM: numpy" in out
    assert 'fix: ' in out and '"torchvision==0.16.*"' in out and '"numpy<2"' in out and ran == []


def test_fix_yes_runs_the_single_pip_command(monkeypatch, capsys):
    monkeypatch.setattr(doctor, "installed_versions", lambda: broken(torchvision="0.20.0"))
    ran = []
    monkeypatch.setattr(doctor, "run_pip", lambda command: ran.append(command) or 0)
    assert doctor.diagnose(fix=True, yes=True) == 1  # fixed, but only a fresh process can confirm
    assert len(ran) == 1 and ran[0][-1] == "torchvision==0.29.*"
    assert "run this doctor again" in capsys.readouterr().out
