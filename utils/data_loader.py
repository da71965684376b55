"""Dataset discovery, the label map, the per-user split and the torch Dataset.

A dataset is a folder with one subfolder per user (`ID_1/`, `user_07/`, `alice/`) holding
that user's spectrogram images. Everything a later stage needs to read it the same way
again is a `DatasetManifest`: the users in natural order (their position is the label,
the null token for classifier-free guidance is `num_users`) and a seeded, per-user
stratified split: by image, or by group (--group_pattern, --groups_csv: the recording an
image was cut from goes wholly to one side), or as a lab's own protocol (--split_csv, or
--test_dir: a fixed test set in its own folder). It is computed once, saved as JSON in
every run folder, and read back by every later stage, so no stage ever re-indexes users
on a subset (docs/design.md). The manifest is the pipeline's first artifact: every stage takes it
with --manifest, and a stage run without one builds the same default split
(SPLIT_DEFAULTS) or stops when its split disagrees with a model's. The data folder
itself is never written to.

    python -m utils.data_loader --data_dir D [--resolution R]        # summary of a dataset
    python -m utils.data_loader --data_dir D --manifest_out M.json   # ... and its manifest, for every stage
"""

import argparse
import json
import logging
import random
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from utils.cli import UsageError, run
from utils.files import atomic_path
from utils.image_grid import labelled_grid

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SPLITS = ("train", "val", "test")
MANIFEST_NAME = "dataset_manifest.json"
MANIFEST_FORMAT_VERSION = 1
# The split a stage makes when it is given no manifest: defined here only.
SPLIT_DEFAULTS = {"split_seed": 0, "val_fraction": 0.1, "test_fraction": 0.2}
# The other flags of a new split: where groups or a whole split come from (off by default).
SPLIT_SOURCES = ("group_pattern", "groups_csv", "few_groups", "split_csv", "test_dir")
# Errors PIL raises on broken files: truncated data (OSError), unknown format
# (UnidentifiedImageError, an OSError), malformed headers (SyntaxError, ValueError).
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def natural_key(text):
    """Sort key that puts `ID_2` before `ID_10`."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def user_number(folder_name):
    """The integer a folder answers to: `ID_7` and `user_07` -> 7; other names -> None."""
    match = re.fullmatch(r"(?:id|user)[_\-\s]?0*(\d+)", folder_name, flags=re.IGNORECASE)
    return int(match.group(1)) if match else None


def few(names, shown=3):
    """The first names of a list, for a message: `a, b, c, ...`."""
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


def is_image_file(path):
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def load_rgb(path):
    """Decode an image file into an RGB PIL image, whatever its mode.

    Greyscale, palette and RGBA become RGB (alpha is dropped: spectrograms are opaque);
    16-bit greyscale is scaled by 255/65535 and 32-bit or float greyscale is stretched
    to 0..255, instead of being clipped at 255.
    """
    with Image.open(path) as image:
        image.load()
        if image.mode.startswith("I;16"):
            # Same scale for every file, so intensities stay comparable across images.
            values = np.asarray(image, dtype=np.float64) / 257.0
            image = Image.fromarray(np.round(values).astype(np.uint8), mode="L")
        elif image.mode in ("I", "F"):
            # 32-bit data has no fixed full scale: stretch each image to 0..255.
            values = np.asarray(image, dtype=np.float64)
            low, high = float(values.min()), float(values.max())
            scale = 255.0 / (high - low) if high > low else 0.0
            image = Image.fromarray(np.round((values - low) * scale).astype(np.uint8), mode="L")
        return image.convert("RGB")


@dataclass
class DatasetScan:
    """What is on disk: readable images per user and everything that is not usable."""

    data_dir: Path
    files: dict  # user folder name -> readable image file names, natural order
    unreadable: list  # "user/file" paths of files PIL could not decode
    empty_users: list  # user folders without a readable image (not users)
    sizes: Counter  # (width, height) -> count
    modes: Counter  # PIL mode -> count


def _probe_image(path):
    """(size, mode) of a fully decoded image, or None when the file is unreadable."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.size, image.mode
    except _IMAGE_ERRORS:
        return None


def check_data_dir(data_dir):
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise UsageError(f"data folder {data_dir} does not exist")
    if not data_dir.is_dir():
        raise UsageError(f"--data_dir {data_dir} is a file, not a folder of user subfolders")
    return data_dir


def scan_dataset(data_dir):
    """Find the users (subfolders) and decode every image once to find the broken ones."""
    data_dir = check_data_dir(data_dir)
    folders = sorted(
        (p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: natural_key(p.name),
    )
    candidates = {
        folder.name: sorted((p.name for p in folder.iterdir() if is_image_file(p)), key=natural_key)
        for folder in folders
    }
    paths = [data_dir / user / name for user, names in candidates.items() for name in names]
    # Decoding is the slow part; PIL releases the GIL while it decodes.
    with ThreadPoolExecutor(max_workers=8) as pool:
        probes = dict(zip(paths, pool.map(_probe_image, paths)))

    files, unreadable, empty_users = {}, [], []
    sizes, modes = Counter(), Counter()
    for user, names in candidates.items():
        readable = []
        for name in names:
            probe = probes[data_dir / user / name]
            if probe is None:
                unreadable.append(f"{user}/{name}")
                continue
            readable.append(name)
            sizes[probe[0]] += 1
            modes[probe[1]] += 1
        if readable:
            files[user] = readable
        else:
            empty_users.append(user)

    if not files:
        extensions = " ".join(IMAGE_EXTENSIONS)
        raise UsageError(
            f"no readable image in {data_dir}: expected one subfolder per user "
            f"(ID_1/, user_01/, ...) holding {extensions} files"
        )
    for path in unreadable:
        logger.warning("skipping unreadable image %s", data_dir / path)
    for user in empty_users:
        logger.warning("user folder %s has no readable image; it is not counted as a user", data_dir / user)
    return DatasetScan(data_dir, files, unreadable, empty_users, sizes, modes)


def split_sizes(count, val_fraction, test_fraction):
    """(val, test) sizes of `count` items: rounded shares; with 3 items or more every
    non-zero fraction gets at least one and train keeps at least one."""
    sizes = []
    for fraction in (val_fraction, test_fraction):
        size = round(count * fraction)
        if fraction > 0 and count >= 3:
            size = max(1, size)
        sizes.append(size)
    val_size, test_size = sizes
    while val_size + test_size > count - 1 and (val_size or test_size):
        if test_size >= val_size:
            test_size -= 1
        else:
            val_size -= 1
    return val_size, test_size


def split_user_files(files, user, val_fraction, test_fraction, seed):
    """Seeded split of one user's images into train / val / test.

    The files are sorted before shuffling, so the split depends only on the set of
    file names, the user and the seed, never on the order a file system lists them.
    Each user is shuffled by its own generator, so adding a user leaves the others'
    splits unchanged.
    """
    files = sorted(files, key=natural_key)
    random.Random(f"{seed}/{user}").shuffle(files)
    val_size, test_size = split_sizes(len(files), val_fraction, test_fraction)
    return {
        "val": sorted(files[:val_size], key=natural_key),
        "test": sorted(files[val_size:val_size + test_size], key=natural_key),
        "train": sorted(files[val_size + test_size:], key=natural_key),
    }


def split_user_groups(groups, user, val_fraction, test_fraction, seed):
    """Seeded split of one user's groups: every group goes wholly to train, val or test.

    `groups` maps file name -> group. Groups are shuffled (after a natural sort, so file
    order is irrelevant) and taken for test, then val, while that brings the split's image
    count closer to its fraction (at least one group each); train keeps the rest. Returns
    None when the user has too few groups to give every non-zero fraction one and train one.
    """
    members = {}
    for name, group in groups.items():
        members.setdefault(group, []).append(name)
    order = sorted(members, key=natural_key)
    needed = 1 + (val_fraction > 0) + (test_fraction > 0)
    if len(order) < needed:
        return None
    random.Random(f"{seed}/{user}/groups").shuffle(order)
    total, taken = len(groups), {"val": [], "test": []}
    for split, fraction in (("test", test_fraction), ("val", val_fraction)):
        if fraction <= 0:
            continue
        target, count = fraction * total, 0
        # Leave one group for every split still to fill (val, then train).
        while len(order) > (2 if split == "test" and val_fraction > 0 else 1):
            size = len(members[order[0]])
            if count and abs(count + size - target) >= abs(count - target):
                break
            taken[split] += members[order.pop(0)]
            count += size
    return {"val": sorted(taken["val"], key=natural_key), "test": sorted(taken["test"], key=natural_key),
            "train": sorted((name for group in order for name in members[group]), key=natural_key)}


def split_user_blocks(groups, val_fraction, test_fraction):
    """The fallback for a user with too few groups: within each group, in file-name (time)
    order, the last block goes to test, the block before it to val, the rest to train.
    Only the windows at a block boundary can still overlap across the split."""
    members = {}
    for name in sorted(groups, key=natural_key):
        members.setdefault(groups[name], []).append(name)
    parts = {split: [] for split in SPLITS}
    for names in members.values():
        val_size, test_size = split_sizes(len(names), val_fraction, test_fraction)
        train_size = len(names) - val_size - test_size
        parts["train"] += names[:train_size]
        parts["val"] += names[train_size:train_size + val_size]
        parts["test"] += names[train_size + val_size:]
    return {split: sorted(names, key=natural_key) for split, names in parts.items()}


def read_file_table(path, flag):
    """{relative path: value} from a CSV of two columns (file, value); a header row is allowed."""
    import csv

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{flag} {path} does not exist")
    table = {}
    with path.open(newline="", encoding="utf-8-sig") as handle:
        for number, row in enumerate(csv.reader(handle), start=1):
            if not row or not "".join(row).strip():
                continue
            if len(row) != 2:
                raise UsageError(f"{flag} {path} line {number}: expected two columns (file, value), got {len(row)}")
            name, value = (cell.strip() for cell in row)
            if number == 1 and name.lower() in ("file", "path", "filename"):
                continue
            table[Path(name).as_posix()] = value
    if not table:
        raise UsageError(f"{flag} {path} lists no file")
    return table


def listed(table, scan, flag):
    """`table` checked against a scan: every readable image listed, no listed file unknown."""
    present = {f"{user}/{name}" for user, names in scan.files.items() for name in names}
    problems = []
    for names, what in ((sorted(present - set(table), key=natural_key), "images are not listed"),
                        (sorted(set(table) - present - set(scan.unreadable), key=natural_key),
                         "listed files are not images of the dataset")):
        if names:
            problems.append(f"{len(names)} {what} ({few(names)})")
    if problems:
        raise UsageError(f"{flag}: {'; '.join(problems)}; files are given relative to --data_dir as <user>/<file>")
    return table


def file_groups(scan, group_pattern=None, groups_csv=None):
    """user -> {file name: group} for every readable image: the first group of the regular
    expression (or its whole match) searched in `<user>/<file>`, or the CSV's group."""
    if group_pattern and groups_csv:
        raise UsageError("--group_pattern and --groups_csv both say where groups come from: give one")
    if groups_csv:
        table = listed(read_file_table(groups_csv, "--groups_csv"), scan, "--groups_csv")
        return {user: {name: table[f"{user}/{name}"] for name in names} for user, names in scan.files.items()}
    try:
        pattern = re.compile(group_pattern)
    except re.error as error:
        raise UsageError(f"--group_pattern {group_pattern!r} is not a regular expression: {error}") from None
    groups, unmatched = {}, []
    for user, names in scan.files.items():
        groups[user] = {}
        for name in names:
            match = pattern.search(f"{user}/{name}")
            if match is None:
                unmatched.append(f"{user}/{name}")
            else:
                groups[user][name] = match.group(1) if pattern.groups else match.group(0)
    if unmatched:
        raise UsageError(f"--group_pattern {group_pattern!r} matches no part of {len(unmatched)} file paths "
                         f"({few(unmatched)})")
    return groups


@dataclass
class DatasetManifest:
    """The label map and the split, as saved in every run folder."""

    users: list  # folder names in natural order; a user's label is its position
    splits: dict  # split -> user -> image file names inside that user's folder
    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    data_dir: str = ""  # where it was built; informational, stages take --data_dir
    unreadable: list = field(default_factory=list)
    train_images_per_user: int = None  # a budget: train keeps this many per user, the rest is `unused`
    unused: dict = field(default_factory=dict)  # user -> train images left out by the budget
    grouping: str = ""  # "" (at random by image), "pattern", "csv" (by group) or "split_csv" (a given split)
    grouping_source: str = ""  # the --group_pattern, --groups_csv or --split_csv it came from
    groups: dict = field(default_factory=dict)  # user -> file name -> group (the unit that goes wholly to one split)
    blocked_users: list = field(default_factory=list)  # users split in time blocks within groups (too few groups)
    test_dir: str = ""  # a fixed test set in its own folder: the test split's images live there

    def root(self, split, data_dir):
        """The folder a split's relative paths are under: --test_dir for a fixed test set."""
        return Path(self.test_dir) if split == "test" and self.test_dir else Path(data_dir)

    def describe(self):
        """How the split was made, in one line."""
        if self.grouping == "split_csv":
            return f"as given by --split_csv {self.grouping_source}"
        text = {"": "at random by image", "pattern": f"by group (--group_pattern {self.grouping_source})",
                "csv": f"by group (--groups_csv {self.grouping_source})"}[self.grouping]
        text += f", split seed {self.seed}: val {self.val_fraction:g}, " + (
            f"test: every image of --test_dir {self.test_dir}" if self.test_dir else f"test {self.test_fraction:g}")
        if self.blocked_users:
            text += (f"; {len(self.blocked_users)} users with too few groups split in time blocks within each group "
                     f"({' '.join(self.blocked_users)})")
        return text

    def restricted(self, images_per_user):
        """This split with at most `images_per_user` train images per user, the same ones in
        every stage: drawn with the split seed from the user's whole train pool (the train
        images and those an earlier budget left out), so budgets are nested. Val and test
        stay as they are."""
        if images_per_user < 1:
            raise UsageError(f"--train_images_per_user must be at least 1, got {images_per_user}")
        train, unused = {}, {}
        for user in self.users:
            pool = sorted(self.splits["train"].get(user, []) + self.unused.get(user, []), key=natural_key)
            random.Random(f"{self.seed}/{user}/budget").shuffle(pool)
            train[user] = sorted(pool[:images_per_user], key=natural_key)
            unused[user] = sorted(pool[images_per_user:], key=natural_key)
        return replace(self, splits={**self.splits, "train": train}, unused=unused,
                       train_images_per_user=images_per_user)

    def train_counts(self):
        """Train images per user, label order."""
        return [self.count("train", user) for user in self.users]

    @property
    def num_users(self):
        return len(self.users)

    @property
    def null_index(self):
        """Index of the unconditional token for classifier-free guidance: not a user."""
        return self.num_users

    @property
    def label_map(self):
        return {user: index for index, user in enumerate(self.users)}

    def samples(self, split):
        """(relative path, label) pairs of one split, users in label order."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return [
            (f"{user}/{name}", label)
            for label, user in enumerate(self.users)
            for name in self.splits[split].get(user, [])
        ]

    def count(self, split, user):
        return len(self.splits[split].get(user, []))

    def resolve_user(self, token):
        """Folder name for a user given as its folder name or its number (7 -> ID_7)."""
        token = str(token).strip()
        if token in self.users:
            return token
        if token.isdigit():
            matches = [user for user in self.users if user_number(user) == int(token)]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise UsageError(f"user {token} is ambiguous: it matches {', '.join(matches)}; give the folder name")
        raise UsageError(f"unknown user {token!r}; valid users: {' '.join(self.users)}")

    def resolve_users(self, tokens):
        """Folder names for a list of user tokens; `all` selects every user."""
        if [str(t).lower() for t in tokens] == ["all"]:
            return list(self.users)
        return [self.resolve_user(token) for token in tokens]

    def check_matches(self, data_dir):
        """Fail clearly when a data folder's users or files are not the ones this manifest lists."""
        data_dir = check_data_dir(data_dir)
        folders = {p.name: p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith(".")}
        missing = [user for user in self.users if user not in folders]
        if missing:
            raise UsageError(
                f"{data_dir} lacks users of the stored label map: {' '.join(missing)}; "
                "use the data folder the model was trained on"
            )
        on_disk = {name: {f"{name}/{p.name}" for p in folder.iterdir() if is_image_file(p)}
                   for name, folder in folders.items()}
        # A user folder the map does not know would get no row: the datasets differ.
        extra = sorted((name for name in set(folders) - set(self.users) if on_disk[name]), key=natural_key)
        if extra:
            raise UsageError(
                f"{data_dir} has users the stored label map does not know: {' '.join(extra)}; "
                "use the data folder the model was trained on, or train again on this one"
            )
        in_data = ("train", "val") if self.test_dir else SPLITS
        listed = self.files(in_data) | set(self.unreadable) | {f"{u}/{name}" for u, names in self.unused.items() for name in names}
        present = set().union(*(on_disk[user] for user in self.users))
        _report_difference(data_dir, listed, present)
        if self.test_dir:
            test_dir = Path(self.test_dir)
            if not test_dir.is_dir():
                raise UsageError(f"the fixed test set {test_dir} of the dataset manifest does not exist")
            present = {f"{p.parent.name}/{p.name}" for p in test_dir.glob("*/*") if is_image_file(p)}
            _report_difference(test_dir, self.files(["test"]), present)

    def files(self, splits=SPLITS):
        """The relative paths of every image in the given splits."""
        return {f"{user}/{name}" for split in splits for user, names in self.splits[split].items() for name in names}

    def split_mismatch(self, other):
        """None when both manifests map the same users and split the same files, else why not."""
        if self.users != other.users:
            return f"they map other users ({self.num_users} vs {other.num_users})"
        if self.test_dir != other.test_dir:
            return f"their test images come from different folders ({self.test_dir or 'the data folder'} vs " \
                   f"{other.test_dir or 'the data folder'})"
        if all(self.files([split]) == other.files([split]) for split in SPLITS):
            return None
        if self.train_images_per_user != other.train_images_per_user:
            budgets = [f"{m.train_images_per_user} train images per user" if m.train_images_per_user else "every train image"
                       for m in (self, other)]
            return f"one keeps {budgets[0]}, the other {budgets[1]}"
        seen = self.files(("train", "val")) & other.files(["test"]) | other.files(("train", "val")) & self.files(["test"])
        return (f"their splits differ (split seed {self.seed} vs {other.seed}, test fraction {self.test_fraction:g} "
                f"vs {other.test_fraction:g}): {len(seen)} test images of one are training images of the other")

    def require_same_split(self, other, this, that):
        """UsageError naming both sides unless `other` splits the data as this manifest does."""
        reason = self.split_mismatch(other)
        if reason:
            raise UsageError(f"{this} and {that} disagree on the dataset split: {reason}. Every stage must use one "
                             "split, or test images leak into training; pass the same --manifest to both")

    def to_dict(self):
        return {
            "format_version": MANIFEST_FORMAT_VERSION,
            "data_dir": self.data_dir,
            "num_users": self.num_users,
            "null_index": self.null_index,
            "label_map": self.label_map,
            "users": self.users,
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
            "splits": self.splits,
            "unreadable": self.unreadable,
            "train_images_per_user": self.train_images_per_user,
            "unused": self.unused,
            "grouping": self.grouping,
            "grouping_source": self.grouping_source,
            "groups": self.groups,
            "blocked_users": self.blocked_users,
            "test_dir": self.test_dir,
        }

    def save(self, path):
        """Write the manifest JSON atomically (a reader never sees half a file)."""
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False))

    @classmethod
    def load(cls, path):
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_NAME
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise UsageError(f"no dataset manifest at {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise UsageError(f"dataset manifest {path} is not valid JSON: {error}") from None
        if data.get("format_version") != MANIFEST_FORMAT_VERSION:
            raise UsageError(f"dataset manifest {path} has format {data.get('format_version')!r}, expected {MANIFEST_FORMAT_VERSION}")
        manifest = cls(
            users=data["users"],
            splits=data["splits"],
            seed=data["seed"],
            val_fraction=data["val_fraction"],
            test_fraction=data["test_fraction"],
            data_dir=data["data_dir"],
            unreadable=data["unreadable"],
            train_images_per_user=data.get("train_images_per_user"),
            unused=data.get("unused", {}),
            grouping=data.get("grouping", ""),
            grouping_source=data.get("grouping_source", ""),
            groups=data.get("groups", {}),
            blocked_users=data.get("blocked_users", []),
            test_dir=data.get("test_dir", ""),
        )
        if data["label_map"] != manifest.label_map:
            raise UsageError(f"dataset manifest {path}: label_map disagrees with the user list")
        return manifest


def _report_difference(folder, listed, present):
    gone, new = sorted(listed - present, key=natural_key), sorted(present - listed, key=natural_key)
    if gone or new:
        problems = [f"{len(names)} {what} ({few(names)})"
                    for names, what in ((gone, "listed files are missing"), (new, "files are not in it")) if names]
        raise UsageError(
            f"{folder} does not match the dataset manifest: {'; '.join(problems)}; use the data folder the "
            "manifest was made from, or make a new one (python -m utils.data_loader --data_dir D --manifest_out M)"
        )


def build_manifest(data_dir, val_fraction=SPLIT_DEFAULTS["val_fraction"], test_fraction=SPLIT_DEFAULTS["test_fraction"],
                   seed=SPLIT_DEFAULTS["split_seed"], scan=None, group_pattern=None, groups_csv=None, few_groups=None,
                   split_csv=None, test_dir=None):
    """Scan a dataset folder and split every user's readable images: at random by image,
    by group (`group_pattern` or `groups_csv`), as a split CSV says, and with `test_dir`
    as the fixed test set (then the data folder gives train and val only)."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise UsageError(
            f"split fractions val={val_fraction} test={test_fraction} must be in [0, 1) and leave images for training"
        )
    if split_csv and (group_pattern or groups_csv or test_dir):
        raise UsageError("--split_csv gives the whole split; --group_pattern, --groups_csv and --test_dir would make "
                         "another: give one or the other")
    if few_groups not in (None, "error", "blocks"):
        raise UsageError(f"--few_groups must be error or blocks, got {few_groups!r}")
    scan = scan or scan_dataset(data_dir)
    splits = {split: {} for split in SPLITS}
    manifest = DatasetManifest(users=list(scan.files), splits=splits, seed=seed, val_fraction=val_fraction,
                               test_fraction=test_fraction, data_dir=str(scan.data_dir.resolve()),
                               unreadable=scan.unreadable)
    if split_csv:
        table = listed(read_file_table(split_csv, "--split_csv"), scan, "--split_csv")
        unknown = sorted({value for value in table.values() if value not in SPLITS})
        if unknown:
            raise UsageError(f"--split_csv {split_csv}: unknown split names {' '.join(unknown)}; use train, val, test")
        for user, names in scan.files.items():
            for split in SPLITS:
                splits[split][user] = [name for name in names if table[f"{user}/{name}"] == split]
        without = [user for user in scan.files if not splits["train"][user]]
        if without:
            raise UsageError(f"--split_csv {split_csv} gives no train image to {' '.join(without)}: every user needs one")
        manifest.grouping, manifest.grouping_source = "split_csv", str(split_csv)
        return manifest

    if test_dir:
        test_scan = scan_dataset(test_dir)
        unknown = [user for user in test_scan.files if user not in scan.files]
        if unknown:
            raise UsageError(f"--test_dir {test_dir} has users the dataset does not have: {' '.join(unknown)}")
        manifest.test_dir = str(test_scan.data_dir.resolve())
        manifest.test_fraction = test_fraction = 0.0
    groups = file_groups(scan, group_pattern, groups_csv) if group_pattern or groups_csv else None
    too_few = []
    for user, files in scan.files.items():
        if groups is None:
            parts = split_user_files(files, user, val_fraction, test_fraction, seed)
        else:
            parts = split_user_groups(groups[user], user, val_fraction, test_fraction, seed)
            if parts is None:
                too_few.append(user)
                parts = split_user_blocks(groups[user], val_fraction, test_fraction)
        for split, names in parts.items():
            splits[split][user] = names
    if test_dir:
        splits["test"] = {user: test_scan.files.get(user, []) for user in scan.files}
    if groups is not None:
        manifest.groups = groups
        manifest.grouping, manifest.grouping_source = ("pattern", group_pattern) if group_pattern else ("csv", str(groups_csv))
    if too_few and few_groups != "blocks":
        counts = ", ".join(f"{user} ({len(set(groups[user].values()))})" for user in too_few[:10])
        raise UsageError(f"{len(too_few)} users have too few groups for a train, val and test split: {counts}; "
                         "give them more recordings, lower a fraction to 0, or pass --few_groups blocks to split "
                         "their groups in time blocks")
    manifest.blocked_users = too_few
    return manifest


def add_split_arguments(parser, new_split=True):
    """--manifest, and (with `new_split`) the flags of a new split when none is given."""
    group = parser.add_argument_group("dataset split")
    group.add_argument("--manifest", help="dataset_manifest.json (or a folder holding one) whose label map and split "
                                          "to use; written by `python -m utils.data_loader --manifest_out`")
    if new_split:
        group.add_argument("--split_seed", type=int, help=f"without --manifest: seed of the per-user split "
                                                          f"(default {SPLIT_DEFAULTS['split_seed']})")
        group.add_argument("--val_fraction", type=float, help=f"without --manifest: share of each user's images for "
                                                              f"validation (default {SPLIT_DEFAULTS['val_fraction']})")
        group.add_argument("--test_fraction", type=float, help=f"without --manifest: share of each user's images held "
                                                               f"out for testing (default {SPLIT_DEFAULTS['test_fraction']})")
        group.add_argument("--group_pattern", help="split by group: a regular expression searched in each <user>/<file> "
                                                   "path; its first group (or the whole match) names the image's group "
                                                   "(e.g. its recording), which goes wholly to train, val or test. "
                                                   r"Windows named <recording>_<n>.png: '(.*)_\d+\.\w+$'")
        group.add_argument("--groups_csv", help="split by group: a CSV of <user>/<file>,group for every image")
        group.add_argument("--few_groups", choices=["error", "blocks"],
                           help="a user with fewer groups than splits: stop naming it (error, default), or split each of "
                                "its groups in time blocks (file-name order: the last images to test)")
        group.add_argument("--split_csv", help="a lab's own protocol: a CSV of <user>/<file>,split (train, val or test) "
                                               "for every image")
        group.add_argument("--test_dir", help="a fixed test set in the same user-folder layout: its images are the test "
                                              "split (never seen by any model), --data_dir gives train and val")
        group.add_argument("--train_images_per_user", type=int,
                           help="a budget: keep this many train images per user (seeded, the same in every stage; "
                                "val and test unchanged), as a user with that many images has")
    return group


def stage_manifest(args, data_dir, scan=None):
    """The manifest a stage works with: --manifest when given, else a new split of
    `data_dir` from the split flags (SPLIT_DEFAULTS where unset), restricted to
    --train_images_per_user when given; checked against the data."""
    given = {name: getattr(args, name) for name in (*SPLIT_DEFAULTS, *SPLIT_SOURCES) if getattr(args, name, None) is not None}
    if getattr(args, "manifest", None):
        if given:
            raise UsageError(f"--manifest gives a stored split; {' '.join('--' + n for n in given)} would make a new "
                             "one: give one or the other")
        manifest = DatasetManifest.load(args.manifest)
    else:
        if "test_dir" in given and "test_fraction" in given:
            raise UsageError("--test_dir is the test set; --test_fraction would hold out another: drop one")
        settings = {**SPLIT_DEFAULTS, **given}
        manifest = build_manifest(data_dir, settings["val_fraction"], settings["test_fraction"], settings["split_seed"],
                                  scan=scan, **{name: given.get(name) for name in SPLIT_SOURCES})
    if getattr(args, "train_images_per_user", None) is not None:
        manifest = manifest.restricted(args.train_images_per_user)
    manifest.check_matches(data_dir)
    return manifest


def pil_to_array(image, resolution):
    """An RGB PIL image as a (3, R, R) uint8 tensor; the one resize every image goes through."""
    if image.size != (resolution, resolution):
        # PIL scales the bicubic kernel with the reduction, so downsampling is antialiased.
        image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


class SpectrogramDataset(torch.utils.data.Dataset):
    """One split of a dataset as tensors in [-1, 1] of shape (3, R, R).

    Items are dicts: `pixel_values` (3, R, R) float32, `user_index` (the label from the
    manifest) and `path`. No flips: a mirrored spectrogram is a different motion.
    A file that breaks after the manifest was made is reported by name and replaced by
    the next readable item, so an epoch never crashes halfway.

    Decoded, resized images stay in memory as uint8, up to `cache_bytes` per dataset: a
    trainer reads every image once per epoch, and decoding plus resizing a PNG costs a
    noticeable share of a quick VAE step.
    """

    cache_bytes = 2 * 1024**3

    def __init__(self, data_dir, manifest, split, resolution):
        if resolution < 1:
            raise UsageError(f"--resolution must be positive, got {resolution}")
        self.data_dir = Path(data_dir)
        self.manifest = manifest
        self.split = split
        self.resolution = resolution
        self.root = manifest.root(split, data_dir)
        self.samples = manifest.samples(split)
        self._broken = set()
        self._cache = {}  # relative path -> (3, R, R) uint8

    def __len__(self):
        return len(self.samples)

    def load_image(self, relative_path):
        pixels = self._cache.get(relative_path)
        if pixels is None:
            pixels = pil_to_array(load_rgb(self.root / relative_path), self.resolution)
            if (len(self._cache) + 1) * pixels.numel() <= self.cache_bytes:
                self._cache[relative_path] = pixels
        return pixels.float() / 127.5 - 1.0  # (3, R, R) in [-1, 1]

    def __getitem__(self, index):
        if not 0 <= index < len(self.samples):
            raise IndexError(index)
        for offset in range(len(self.samples)):
            relative_path, label = self.samples[(index + offset) % len(self.samples)]
            if relative_path in self._broken:
                continue
            try:
                pixel_values = self.load_image(relative_path)
            except _IMAGE_ERRORS as error:
                self._broken.add(relative_path)
                logger.warning("skipping unreadable image %s (%s)", self.root / relative_path, error)
                continue
            return {"pixel_values": pixel_values, "user_index": label, "path": relative_path}
        raise UsageError(f"no readable image left in the {self.split} split of {self.data_dir}")


def format_summary(scan, manifest, resolution, leak=None):
    counts = [len(scan.files[user]) for user in manifest.users]
    lines = [
        f"dataset {scan.data_dir}",
        f"{manifest.num_users} users, {sum(counts)} readable images ({min(counts)} to {max(counts)} per user); "
        f"train {len(manifest.files(['train']))}, val {len(manifest.files(['val']))}, test {len(manifest.files(['test']))}"
        + (f"; budget: {manifest.train_images_per_user} train images per user, the other "
           f"{sum(map(len, manifest.unused.values()))} train images unused" if manifest.train_images_per_user else ""),
        f"split {manifest.describe()}",
        "",
        f"{'label':>5}  {'user':<24} {'number':>6} {'images':>6} {'groups':>6} {'train':>6} {'val':>5} {'test':>5}",
    ]
    for label, user in enumerate(manifest.users):
        number = user_number(user)
        groups = len(set(manifest.groups[user].values())) if manifest.groups else "-"
        lines.append(
            f"{label:>5}  {user:<24} {'-' if number is None else number:>6} {len(scan.files[user]):>6} {groups:>6} "
            f"{manifest.count('train', user):>6} {manifest.count('val', user):>5} {manifest.count('test', user):>5}"
        )
    lines.append(f"null (unconditional) token index: {manifest.null_index}")
    lines.append("")
    lines.append("image sizes: " + ", ".join(f"{w}x{h} ({n})" for (w, h), n in scan.sizes.most_common()))
    lines.append("image modes: " + ", ".join(f"{mode} ({n})" for mode, n in scan.modes.most_common()))
    lines.append(f"loaded as: float tensors (3, {resolution}, {resolution}) in [-1, 1]")
    if scan.empty_users:
        lines.append("folders without a readable image (not users): " + " ".join(scan.empty_users))
    lines.append(f"unreadable files: {len(scan.unreadable)}")
    lines.extend(f"  {path}" for path in scan.unreadable)
    if leak is not None:
        lines.append(leak["message"])
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m utils.data_loader",
        description="Summarise a spectrogram dataset: users, images per user and split, sizes, "
        "modes and unreadable files. The data folder is only read.",
    )
    parser.add_argument("--data_dir", required=True, help="folder with one subfolder of images per user (ID_1/, user_01/, alice/ ...)")
    parser.add_argument("--resolution", type=int, default=256, help="side length images are resized to when loaded (default 256)")
    add_split_arguments(parser)
    parser.add_argument("--manifest_out", help="also write the dataset manifest JSON to this path (outside the data "
                                               "folder): the stage-0 artifact every stage takes with --manifest")
    parser.add_argument("--leak_pairs", help="also write the leak check's closest test/train pairs side by side (PNG)")
    parser.add_argument("--no_leak_check", action="store_true",
                        help="skip the leak check (it loads every train and test image once at 64x64)")
    parser.add_argument("--grid", help="also write an overview PNG: the first images of the first users, one row each")
    parser.add_argument("--grid_users", type=int, default=4, help="users (rows) in --grid (default 4)")
    parser.add_argument("--grid_images", type=int, default=4, help="images per user (columns) in --grid (default 4)")
    return parser.parse_args(argv)


def dataset_grid(data_dir, scan, num_users, images_per_user, resolution):
    """The first images of the first users, labelled with the user folder in the margin."""
    users = list(scan.files)[:num_users]
    rows = [[load_rgb(Path(data_dir) / user / name) for name in scan.files[user][:images_per_user]] for user in users]
    return labelled_grid(rows, users, cell_size=resolution)


def main(args):
    data_dir = check_data_dir(args.data_dir)
    for flag in ("manifest_out", "grid", "leak_pairs"):
        value = getattr(args, flag)
        if value and Path(value).resolve().is_relative_to(data_dir.resolve()):
            raise UsageError(f"--{flag} {value} is inside the data folder, which is never written to")
    scan = scan_dataset(data_dir)
    manifest = stage_manifest(args, data_dir, scan=scan)
    # Loading one image proves the whole path from file to tensor works at this resolution.
    SpectrogramDataset(data_dir, manifest, "train", args.resolution)[0]
    leak = None
    if not args.no_leak_check and manifest.files(["test"]):
        from utils.leakage import check_split, pairs_grid

        leak, train, test = check_split(data_dir, manifest)
    print(format_summary(scan, manifest, args.resolution, leak))
    if args.leak_pairs and leak is not None:
        with atomic_path(args.leak_pairs) as tmp:
            pairs_grid(leak, train[0], test[0]).save(tmp, format="PNG")
        print(f"leak check pairs (test | nearest train, with their distance) written to {args.leak_pairs}")
    if args.manifest_out:
        manifest.save(args.manifest_out)
        print(f"manifest written to {args.manifest_out}")
    if args.grid:
        with atomic_path(args.grid) as tmp:
            dataset_grid(data_dir, scan, args.grid_users, args.grid_images, args.resolution).save(tmp, format="PNG")
        print(f"grid written to {args.grid}")
    return 0


if __name__ == "__main__":
    run(main, parse_args())
