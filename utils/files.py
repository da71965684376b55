"""Writing files so that a reader never sees half of one."""

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from utils.cli import UsageError


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it onto `path` when the block succeeds.

        with atomic_path(out) as tmp:
            image.save(tmp, format="PNG")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_folder(path):
    """Yield a hidden temporary folder beside `path`; when the block succeeds it replaces
    `path` (an existing folder there is removed), otherwise it is deleted.

        with atomic_folder(out / "final_model") as tmp:
            model.save_pretrained(tmp)
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path, data):
    """`data` as indented UTF-8 JSON, written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def output_folder(path, overwrite, flag="--output_dir"):
    """`path` as a Path, refusing an existing file or non-empty folder unless `overwrite`."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise UsageError(f"{flag} {path} exists and is not empty: choose another folder or --overwrite")
    return path
