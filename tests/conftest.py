import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]

# Nothing in the tests may reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"
# Under pytest-xdist (pytest.ini runs two workers) every process gets one thread: two
# workers whose torch each spin two threads on two cores slow each other down many times.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"


def run_cli(*args, cwd=REPO_ROOT, env=None):
    """Run a command line the way a user types it (`env`: extra variables); returns the CompletedProcess."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH="", **(env or {}))
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


INTERRUPT_AT_STEP = """
import runpy, sys
from utils.training import MetricsLog

log = MetricsLog.log


def ctrl_c_at_step(self, step, **values):
    if step == {step} and "loss" in values:  # after step {step}'s optimiser step, before it is logged
        raise KeyboardInterrupt
    return log(self, step, **values)


MetricsLog.log = ctrl_c_at_step
sys.argv[0] = {script!r}
runpy.run_path({script!r}, run_name="__main__")
"""


def run_interrupted(script, *args, step):
    """Run a training script as `run_cli` does, with Ctrl-C pressed during step `step`."""
    return run_cli("-c", INTERRUPT_AT_STEP.format(script=str(script), step=step), *args)


def write_image(path, mode="RGB", size=(40, 30), seed=0):
    """A random image of the given PIL mode, written in the format its suffix names."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "P": 1}[mode]
    pixels = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    if mode == "RGBA":
        pixels[..., 3] = 255
    image = Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode="L" if mode == "P" else mode)
    if mode == "P":
        image = image.convert("P")
    image.save(path)
    return path


@pytest.fixture
def mixed_dataset(tmp_path):
    """The foundation issue's folder: RGB PNGs, RGBA PNGs, greyscale JPGs, a corrupt
    PNG and an empty user folder."""
    root = tmp_path / "data"
    for i in range(6):
        write_image(root / "ID_1" / f"img_{i}.png", "RGB", seed=i)
        write_image(root / "ID_2" / f"img_{i}.PNG", "RGBA", seed=10 + i)
    for i in range(5):
        write_image(root / "user_03" / f"frame{i}.jpg", "L", seed=20 + i)
    (root / "ID_1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (root / "empty_user").mkdir()
    (root / "ID_1" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="session")
def tiny_generator(tmp_path_factory):
    """A tiny stage-1 + stage-2 run on 3 simulated users at 32x32: ROOT/{data, vae, diffusion}."""
    from utils.gait_simulator import SimulationSettings, write_dataset

    root = tmp_path_factory.mktemp("stage2")
    write_dataset(root / "data", SimulationSettings(num_users=3, images_per_user=10, resolution=32), progress=False)
    for command in (
        ["training/train_vae.py", "--output_dir", root / "vae"],
        ["training/train_diffusion.py", "--vae_path", root / "vae/final_model", "--output_dir", root / "diffusion"],
    ):
        result = run_cli(*command, "--data_dir", root / "data", "--preset", "tiny", "--device", "cpu")
        assert result.returncode == 0, result.stderr
    return root
