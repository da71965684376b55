"""The whole job in one command: data -> VAE -> check -> diffusion -> generation -> evaluation -> report.

    python run_pipeline.py                                   # built-in simulated dataset, quick preset
    python run_pipeline.py --data_dir /path/to/your/data     # your own user folders
    python run_pipeline.py --preset tiny --output_dir /tmp/p # a smoke test in about a minute
    python run_pipeline.py --diffusion_steps 9600 --guidance_scale 2  # 3x the diffusion training (README, Results)

Each stage runs the project's own script in a subprocess, with the same Python:

    data        python -m utils.gait_simulator   (skipped with --data_dir)
    manifest    python -m utils.data_loader      (the dataset summary and OUTPUT/dataset_manifest.json:
                                                  users and split, passed to every later stage)
    vae         training/train_vae.py
    check_vae   check_vae.py                     (stops the run when PSNR < the preset's gate)
    diffusion   training/train_diffusion.py
    generate    inference/generate.py            (every user)
    evaluate    inference/evaluate.py            (trains the person-ID classifiers, report)

OUTPUT/report.md sums it all up with pictures; OUTPUT/pipeline.json records the settings and
each finished stage's command and time (written before the first stage and after each one, so
an interrupted run keeps them). Re-running skips every stage whose final output is complete; an
interrupted training resumes from its last checkpoint; a re-run with other settings is refused;
--force redoes everything.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from utils.cli import UsageError, run
from utils.evaluation import render_markdown
from utils.files import write_json
from utils.presets import PRESET_NAMES, PRESETS

REPO_ROOT = Path(__file__).resolve().parent
SPLIT_FLAGS = ("group_pattern", "groups_csv", "few_groups", "split_csv", "test_dir")  # passed to the manifest stage
DIFFUSION_FLAGS = {"diffusion_steps": "max_train_steps", "guidance_scale": "guidance_scale"}  # to the diffusion stage


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Run every stage on the built-in simulated dataset or on your data "
                                            "(see the module docstring).")
    p.add_argument("--data_dir", help="your dataset (one folder per user); default: simulate the built-in one")
    p.add_argument("--preset", choices=PRESET_NAMES, default="quick", help="model sizes and budgets of every stage")
    p.add_argument("--output_dir", default="outputs/pipeline", help="one folder for every stage's output")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--images_to_generate", type=int, help="generated images per user (preset)")
    p.add_argument("--strength", type=float,
                   help="generation from real train images noised this far, in (0, 1]; 1: from pure noise (preset)")
    p.add_argument("--train_images_per_user", type=int,
                   help="a budget-honest run: every model (VAE, diffusion, classifiers) sees only this many train "
                        "images per user, the same ones (val and test unchanged): what a user with N images gets")
    p.add_argument("--diffusion_steps", type=int,
                   help="diffusion training steps (preset); the stage's time grows in proportion (README, Results)")
    p.add_argument("--guidance_scale", type=float,
                   help="classifier-free guidance, stored with the diffusion model and used to generate (preset)")
    split = p.add_argument_group("the split (made once, in the manifest stage; see python -m utils.data_loader --help)")
    split.add_argument("--group_pattern", help="split by group: a regular expression over <user>/<file> whose first "
                                               r"group names the recording, e.g. '(.*)_\d+\.\w+$'")
    split.add_argument("--groups_csv", help="split by group: a CSV of <user>/<file>,group")
    split.add_argument("--few_groups", choices=["error", "blocks"], help="a user with too few groups: stop (default) or "
                                                                        "split its groups in time blocks")
    split.add_argument("--split_csv", help="a lab's protocol: a CSV of <user>/<file>,split")
    split.add_argument("--test_dir", help="a fixed test set in the user-folder layout, never seen by any model")
    p.add_argument("--force", action="store_true", help="redo every stage, even those already complete")
    return p.parse_args(argv)


def strength_of(args):
    """How far generation noises a real train image: --strength, else the preset's (1: from noise)."""
    return PRESETS[args.preset]["pipeline"]["strength"] if args.strength is None else args.strength


def stages(args, out, data_dir):
    """(name, marker of a complete output, folder the stage owns, command) in running order."""
    python = [sys.executable]
    settings = PRESETS[args.preset]["pipeline"]
    device = ["--device", args.device]
    preset = ["--preset", args.preset]
    vae_model, diffusion_model = out / "vae/final_model", out / "diffusion/final_model"
    manifest = out / "dataset_manifest.json"
    split = ["--manifest", manifest]
    strength = strength_of(args)
    plan = []
    if not args.data_dir:
        plan.append(("data", data_dir / "dataset_card.json", data_dir, python + [
            "-m", "utils.gait_simulator", "--output_dir", data_dir, "--num_users", settings["num_users"],
            "--images_per_user", settings["images_per_user"], "--resolution", settings["resolution"], "--seed", 0,
            "--overwrite"]))
    plan += [
        ("manifest", manifest, manifest, python + [
            "-m", "utils.data_loader", "--data_dir", data_dir, "--manifest_out", manifest,
            "--resolution", settings["resolution"], "--leak_pairs", out / "leak_check.png",
            *(["--train_images_per_user", args.train_images_per_user] if args.train_images_per_user else []),
            *[part for flag in SPLIT_FLAGS if getattr(args, flag) for part in (f"--{flag}", getattr(args, flag))]]),
        ("vae", vae_model / "config.json", out / "vae", python + [
            "training/train_vae.py", "--data_dir", data_dir, "--output_dir", out / "vae", *split, *preset, *device,
            "--resume_from_checkpoint", "latest"]),
        ("check_vae", out / "vae_check/vae_check.json", out / "vae_check", python + [
            "check_vae.py", "--vae_path", vae_model, "--data_dir", data_dir, "--output_dir", out / "vae_check",
            *split, "--min_psnr", settings["min_psnr"], *device]),
        ("diffusion", diffusion_model / "model_index.json", out / "diffusion", python + [
            "training/train_diffusion.py", "--vae_path", vae_model, "--data_dir", data_dir,
            "--output_dir", out / "diffusion", *split, *preset, *device, "--resume_from_checkpoint", "latest",
            *[part for flag, stage_flag in DIFFUSION_FLAGS.items() if getattr(args, flag) is not None
              for part in (f"--{stage_flag}", getattr(args, flag))]]),
        ("generate", out / "generated/manifest.json", out / "generated", python + [
            "inference/generate.py", "--model_path", diffusion_model, "--user_ids", "all", "--num_images_per_user",
            args.images_to_generate or settings["images_to_generate"], "--output_dir", out / "generated",
            "--batch_size", 64, "--dtype", "auto", "--grid", "--overwrite", *device, "--strength", strength,
            *(["--source_dir", data_dir] if strength < 1 else [])]),
        ("evaluate", out / "evaluation/report.json", out / "evaluation", python + [
            "inference/evaluate.py", "--data_dir", data_dir, "--generated_dir", out / "generated",
            "--output_dir", out / "evaluation", *split, *preset, *device, "--overwrite"]),
    ]
    return [(name, marker, owned, [str(part) for part in command]) for name, marker, owned, command in plan]


def minutes(seconds):
    return f"{int(seconds // 60)}m{seconds % 60:04.1f}s"


def machine():
    import torch

    from utils.training import cpu_model

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu_model()}, {os.cpu_count()} CPU cores, {gpu}; Python " \
           f"{platform.python_version()}, torch {torch.__version__}"


def write_report(out, record):
    """OUTPUT/report.md: the numbers of every stage and the pictures, paths relative to OUTPUT."""
    check = json.loads((out / "vae_check/vae_check.json").read_text())
    evaluation = json.loads((out / "evaluation/report.json").read_text())
    generated = json.loads((out / "generated/manifest.json").read_text())
    samples = sorted((out / "diffusion/samples").glob("*.png"))
    lines = [
        "# Pipeline report", "", *evaluation["headline"], "",
        f"`{record['command']}` — preset `{record['preset']}`, data `{record['data_dir']}`"
        + (f", {record['train_images_per_user']} train images per user for every model"
           if record.get("train_images_per_user") else "")
        + f", finished {record['finished']}, on {record['machine']}.", "",
        "| stage | time | |", "|---|---|---|",
        *[f"| {s['name']} | {minutes(s['seconds'])} | {'skipped: already complete' if s['skipped'] else ''} |"
          for s in record["stages"]],
        f"| **all** | **{minutes(record['seconds'])}** | this run |", "",
        "## Stage 1: VAE", "",
        f"Test split, {check['num_images']} images at {check['resolution']}x{check['resolution']}: PSNR "
        f"**{check['psnr']['mean']:.2f} dB** (a 2x bicubic round trip: {check['bicubic_psnr']['mean']:.2f} dB), "
        f"SSIM {check['ssim']['mean']:.3f}; verdict: {check['verdict']['en']}. Originals over reconstructions:", "",
        "![VAE check](vae_check/vae_check.png)", "",
        "## Stage 2: diffusion", "",
    ]
    log = out / "diffusion/logs/metrics.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
    heldout = [r for r in records if "heldout_loss" in r]
    if heldout:  # the trainer ships the weights of the lowest held-out loss
        best = min(heldout, key=lambda r: r["heldout_loss"])
        trained = max(r["step"] for r in records if "loss" in r)
        lines += [f"Held-out loss (val split) lowest at step {best['step']} ({best['heldout_loss']:.4f}) of "
                  f"{trained} steps trained: `diffusion/final_model` holds that step's weights. Training and "
                  "held-out loss:", "", "![curves](diffusion/logs/curves.png)", ""]
    if samples:
        lines += [f"The last validation grid, {samples[-1].stem} (first column real, then one seed per column):", "",
                  f"![samples]({samples[-1].relative_to(out).as_posix()})", ""]
    resolved = generated["resolved"]
    lines += [
        "## Generation", "",
        f"{len(generated['images'])} images, {len(resolved['users'])} users, {resolved['scheduler']} "
        f"{resolved['num_inference_steps']} steps, guidance {resolved['guidance_scale']}"
        + (f", each from a real train image of its user noised to strength {resolved['strength']}"
           if resolved.get("strength", 1.0) < 1 else "") + ", in `generated/` "
        "(the dataset's layout). First images of each user:", "",
        "![generated](generated/grid.png)", "",
        render_markdown(evaluation, level=2, image_prefix="evaluation/"),
        "The evaluation's own report: [evaluation/report.md](evaluation/report.md).", "",
    ]
    (out / "report.md").write_text("\n".join(lines))


def main(args):
    for flag in ("groups_csv", "split_csv", "test_dir"):  # the stages run from the repository, not from here
        if getattr(args, flag):
            setattr(args, flag, str(Path(getattr(args, flag)).resolve()))
    out = Path(args.output_dir).resolve()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output_dir {out} is a file")
    if args.data_dir:
        from utils.data_loader import check_data_dir

        data_dir = check_data_dir(args.data_dir).resolve()
    else:
        data_dir = out / "data"
    out.mkdir(parents=True, exist_ok=True)
    record_path = out / "pipeline.json"
    previous = json.loads(record_path.read_text()) if record_path.exists() and not args.force else {}
    settings = {"preset": args.preset, "data_dir": str(data_dir), "train_images_per_user": args.train_images_per_user,
                "strength": strength_of(args),
                **{flag: getattr(args, flag) for flag in (*SPLIT_FLAGS, *DIFFUSION_FLAGS)}}
    held = {k: previous.get(k) for k, v in settings.items() if previous.get(k, v) != v}
    if (out / "dataset_manifest.json").exists() and not args.force:
        from utils.data_loader import DatasetManifest

        stored = DatasetManifest.load(out / "dataset_manifest.json").train_images_per_user
        if stored != args.train_images_per_user:
            held["train_images_per_user"] = stored
    if held:
        was = ", ".join(f"{k} {'not given' if v is None else v}" for k, v in held.items())
        raise UsageError(f"{out} holds a run with other settings ({was}); choose another --output_dir or add --force")
    previous_times = {s["name"]: s["seconds"] for s in previous.get("stages", [])}
    plan = stages(args, out, data_dir)
    started = time.perf_counter()
    done = []
    record = {"command": " ".join(["python run_pipeline.py", *sys.argv[1:]]), **settings, "machine": machine(),
              "stages": done, "seconds": 0.0, "finished": None}

    def save_record():  # before the first stage and after each: an interrupted run keeps its settings and times
        record["seconds"] = time.perf_counter() - started
        write_json(record_path, record)

    save_record()
    for number, (name, marker, owned, command) in enumerate(plan, start=1):
        head = f"[stage {number}/{len(plan)} {name}]"
        if args.force and owned.is_dir():  # every owned path lies inside --output_dir, never the user's --data_dir
            shutil.rmtree(owned)
        elif args.force:
            owned.unlink(missing_ok=True)
        if marker.exists():
            print(f"{head} already complete ({marker.relative_to(out)}), skipped", flush=True)
            done.append({"name": name, "seconds": previous_times.get(name, 0.0), "skipped": True, "command": command})
            continue
        print(f"{head} {' '.join(command[1:])}", flush=True)
        stage_start = time.perf_counter()
        result = subprocess.run(command, cwd=REPO_ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        seconds = time.perf_counter() - stage_start
        if result.returncode != 0 or not marker.exists():
            raise UsageError(f"{head} failed (exit {result.returncode}) after {minutes(seconds)}; fix the cause "
                             "above and run the same command again: finished stages are skipped and training "
                             "resumes from its last checkpoint")
        print(f"{head} done in {minutes(seconds)} (total {minutes(time.perf_counter() - started)})", flush=True)
        done.append({"name": name, "seconds": seconds, "skipped": False, "command": command})
        save_record()
    record["finished"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    save_record()
    write_report(out, record)
    print(f"pipeline finished in {minutes(record['seconds'])}: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    run(main, parse_args())
