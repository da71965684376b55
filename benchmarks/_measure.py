"""What the benchmarks measure with: the device's name, peak memory, and synchronised timing."""

import json
import resource
import time
from pathlib import Path

import torch


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device):
    """The CUDA allocator's peak on a GPU; the process's peak resident memory on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def seconds_per_call(function, calls, warmup, device):
    """Mean wall-clock seconds of `function()` over `calls` calls after `warmup` untimed ones,
    with the peak-memory counter reset after the warm-up."""
    for _ in range(warmup):
        function()
    reset_peak_memory(device)
    started = time.perf_counter()
    for _ in range(calls):
        function()
    synchronize(device)
    return (time.perf_counter() - started) / calls


def add_output_arguments(parser):
    """--device and --out, as every benchmark takes them."""
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--out", help="also write the numbers as JSON here")


def publish(result, text, out):
    """Print the benchmark's summary and, with --out, write its numbers as JSON."""
    print(text)
    if out:
        Path(out).write_text(json.dumps(result, indent=2))
    return 0
