"""Where things are by default, and what the detected hardware can take.

Kaggle notebooks have their data under /kaggle/input and a writable /kaggle/working;
elsewhere paths are relative to the current folder. Nothing here is hard-coded into a
trainer: the recipe scripts turn these into explicit flags and print them.
"""

from pathlib import Path

import torch

KAGGLE_WORKING = Path("/kaggle/working")
KAGGLE_DATASET = Path("/kaggle/input/dataset")
SIMULATED_DATA = Path("data/simulated")


def on_kaggle():
    return KAGGLE_WORKING.is_dir()


def outputs_root():
    return KAGGLE_WORKING / "outputs" if on_kaggle() else Path("outputs")


def default_vae_output_dir():
    return outputs_root() / "vae_celeba_standard"


def hardware_recipe():
    """Batch size, precision and accumulation for the detected device, at 64x64.

    T4 (16 GB, no bf16): fp16; P100 (16 GB, no tensor cores): fp32; Ampere or newer:
    bf16; the effective batch stays 64 on GPUs by accumulating where memory is short.
    """
    if not torch.cuda.is_available():
        return {"device": "cpu", "name": "CPU", "batch_size": 16, "gradient_accumulation_steps": 1, "mixed_precision": "no"}
    properties = torch.cuda.get_device_properties(0)
    memory_gb = properties.total_memory / 2**30
    major = properties.major
    precision = "bf16" if major >= 8 else ("fp16" if major == 7 else "no")
    batch = 64 if memory_gb >= 30 else 32 if memory_gb >= 14 else 16
    return {
        "device": "cuda",
        "name": f"{properties.name} ({memory_gb:.0f} GB, sm{major}{properties.minor})",
        "batch_size": batch,
        "gradient_accumulation_steps": 64 // batch,
        "mixed_precision": precision,
    }
