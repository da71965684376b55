import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli, write_image
from utils.cli import UsageError
from utils.data_loader import (
    DatasetManifest,
    SpectrogramDataset,
    build_manifest,
    natural_key,
    scan_dataset,
    split_user_files,
    user_number,
)


def snapshot(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*"))


def test_natural_sort_and_user_numbers():
    names = ["ID_10", "ID_2", "ID_1", "user_03", "alice"]
    assert sorted(names, key=natural_key) == ["alice", "ID_1", "ID_2", "ID_10", "user_03"]
    assert user_number("ID_7") == 7
    assert user_number("user_07") == 7
    assert user_number("User-12") == 12
    assert user_number("alice") is None
    assert user_number("ID_7b") is None


def test_scan_finds_users_and_reports_bad_files(mixed_dataset, caplog):
    scan = scan_dataset(mixed_dataset)
    assert list(scan.files) == ["ID_1", "ID_2", "user_03"]
    assert [len(f) for f in scan.files.values()] == [6, 6, 5]
    assert scan.files["ID_2"][0] == "img_0.PNG"  # upper-case suffix counts
    assert scan.unreadable == ["ID_1/broken.png"]
    assert scan.empty_users == ["empty_user"]
    assert scan.modes == {"RGB": 6, "RGBA": 6, "L": 5}
    assert "broken.png" in caplog.text and "empty_user" in caplog.text


def test_summary_command(mixed_dataset):
    before = snapshot(mixed_dataset)
    result = run_cli("-m", "utils.data_loader", "--data_dir", mixed_dataset, "--resolution", 32)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "3 users, 17 readable images" in out
    for user, count in [("ID_1", 6), ("ID_2", 6), ("user_03", 5)]:
        line = next(line for line in out.splitlines() if f" {user} " in line)
        assert f" {count} " in line
    assert "ID_1/broken.png" in out and "unreadable files: 1" in out
    assert "empty_user" in out
    assert "(3, 32, 32)" in out
    assert "Traceback" not in result.stderr
    assert snapshot(mixed_dataset) == before, "the data folder must never be written to"


@pytest.mark.parametrize("case", ["missing", "file", "no_images", "only_top_level_images"])
def test_summary_bad_input_exits_2(tmp_path, case):
    target = tmp_path / "target"
    if case == "file":
        target.write_text("x")
    elif case == "no_images":
        (target / "ID_1").mkdir(parents=True)
        (target / "ID_1" / "readme.txt").write_text("x")
    elif case == "only_top_level_images":
        write_image(target / "a.png")
    result = run_cli("-m", "utils.data_loader", "--data_dir", target)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error:")
    assert len(result.stderr.strip().splitlines()) == 1


def test_manifest_out_never_inside_data_dir(mixed_dataset, tmp_path):
    inside = run_cli("-m", "utils.data_loader", "--data_dir", mixed_dataset, "--manifest_out", mixed_dataset / "m.json")
    assert inside.returncode == 2 and "never written" in inside.stderr
    assert not (mixed_dataset / "m.json").exists()
    outside = run_cli("-m", "utils.data_loader", "--data_dir", mixed_dataset, "--manifest_out", tmp_path / "m.json")
    assert outside.returncode == 0, outside.stderr
    assert DatasetManifest.load(tmp_path / "m.json").users == ["ID_1", "ID_2", "user_03"]


def test_manifest_out_with_a_budget(mixed_dataset, tmp_path):
    result = run_cli("-m", "utils.data_loader", "--data_dir", mixed_dataset, "--manifest_out", tmp_path / "m.json",
                     "--train_images_per_user", 2, "--split_seed", 1)
    assert result.returncode == 0, result.stderr
    assert "budget: 2 train images per user" in result.stdout
    manifest = DatasetManifest.load(tmp_path / "m.json")
    assert manifest.train_counts() == [2, 2, 2] and manifest.seed == 1
    assert manifest == build_manifest(mixed_dataset, seed=1).restricted(2)


def test_manifest_round_trip(mixed_dataset, tmp_path):
    manifest = build_manifest(mixed_dataset, val_fraction=0.2, test_fraction=0.2, seed=3)
    manifest.save(tmp_path / "run" / "dataset_manifest.json")
    loaded = DatasetManifest.load(tmp_path / "run")  # a run folder works as well as the file
    assert loaded == manifest
    assert loaded.label_map == {"ID_1": 0, "ID_2": 1, "user_03": 2}
    assert loaded.null_index == 3
    stored = json.loads((tmp_path / "run" / "dataset_manifest.json").read_text())
    assert stored["null_index"] == 3 and stored["unreadable"] == ["ID_1/broken.png"]


def test_manifest_load_errors(tmp_path):
    with pytest.raises(UsageError, match="no dataset manifest"):
        DatasetManifest.load(tmp_path / "nothing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UsageError, match="not valid JSON"):
        DatasetManifest.load(tmp_path / "bad.json")


def test_split_is_stratified_disjoint_and_complete():
    files = [f"img_{i}.png" for i in range(150)]
    split = split_user_files(files, "ID_1", val_fraction=0.1, test_fraction=0.2, seed=0)
    assert [len(split[s]) for s in ("train", "val", "test")] == [105, 15, 30]
    assert sorted(split["train"] + split["val"] + split["test"]) == sorted(files)


def test_split_ignores_listing_order_and_depends_on_seed():
    files = [f"img_{i}.png" for i in range(40)]
    shuffled = list(files)
    random.Random(1).shuffle(shuffled)
    a = split_user_files(files, "ID_1", 0.1, 0.2, seed=0)
    assert split_user_files(shuffled, "ID_1", 0.1, 0.2, seed=0) == a
    assert split_user_files(list(reversed(files)), "ID_1", 0.1, 0.2, seed=0) == a
    assert split_user_files(files, "ID_1", 0.1, 0.2, seed=1) != a
    assert split_user_files(files, "ID_2", 0.1, 0.2, seed=0) != a  # users are shuffled independently


def test_split_of_tiny_users_keeps_train():
    assert split_user_files(["a.png"], "u", 0.1, 0.2, 0) == {"train": ["a.png"], "val": [], "test": []}
    three = split_user_files(["a.png", "b.png", "c.png"], "u", 0.1, 0.2, 0)
    assert [len(three[s]) for s in ("train", "val", "test")] == [1, 1, 1]


def test_bad_fractions_are_usage_errors(mixed_dataset):
    with pytest.raises(UsageError):
        build_manifest(mixed_dataset, val_fraction=0.5, test_fraction=0.5)


def test_resolve_user_by_number_and_name(mixed_dataset):
    manifest = build_manifest(mixed_dataset)
    assert manifest.resolve_user(3) == "user_03"
    assert manifest.resolve_user("1") == "ID_1"
    assert manifest.resolve_user("ID_2") == "ID_2"
    assert manifest.resolve_users(["all"]) == ["ID_1", "ID_2", "user_03"]
    with pytest.raises(UsageError, match="valid users: ID_1 ID_2 user_03"):
        manifest.resolve_user(9)


def test_ambiguous_user_number(tmp_path):
    write_image(tmp_path / "ID_7" / "a.png")
    write_image(tmp_path / "user_07" / "a.png")
    with pytest.raises(UsageError, match="ambiguous"):
        build_manifest(tmp_path).resolve_user(7)


def test_check_matches_users(mixed_dataset, tmp_path):
    manifest = build_manifest(mixed_dataset)
    manifest.check_matches(mixed_dataset)
    write_image(tmp_path / "ID_1" / "a.png")
    with pytest.raises(UsageError, match="ID_2 user_03"):
        manifest.check_matches(tmp_path)
    write_image(mixed_dataset / "ID_9" / "a.png")  # a user the label map does not know
    with pytest.raises(UsageError, match="does not know: ID_9"):
        manifest.check_matches(mixed_dataset)


def test_check_matches_files(mixed_dataset):
    manifest = build_manifest(mixed_dataset)
    (mixed_dataset / "ID_2" / "img_3.PNG").unlink()
    with pytest.raises(UsageError, match=r"1 listed files are missing \(ID_2/img_3.PNG\)"):
        manifest.check_matches(mixed_dataset)
    manifest = build_manifest(mixed_dataset)
    write_image(mixed_dataset / "ID_1" / "late.png")
    with pytest.raises(UsageError, match=r"1 files are not in it \(ID_1/late.png\).*--manifest_out"):
        manifest.check_matches(mixed_dataset)


def test_split_mismatch_names_the_leak(mixed_dataset):
    a = build_manifest(mixed_dataset, seed=0)
    assert a.split_mismatch(build_manifest(mixed_dataset, seed=0)) is None
    b = build_manifest(mixed_dataset, seed=1, test_fraction=0.4)
    leaked = len(a.files(["train", "val"]) & b.files(["test"]) | b.files(["train", "val"]) & a.files(["test"]))
    assert leaked > 0
    assert f"{leaked} test images of one are training images of the other" in a.split_mismatch(b)
    with pytest.raises(UsageError, match="the VAE and the classifier disagree on the dataset split"):
        a.require_same_split(b, "the VAE", "the classifier")


@pytest.mark.parametrize("resolution", [16, 48])
def test_dataset_tensors(mixed_dataset, resolution):
    manifest = build_manifest(mixed_dataset, val_fraction=0.0, test_fraction=0.0)
    dataset = SpectrogramDataset(mixed_dataset, manifest, "train", resolution)
    assert len(dataset) == 17
    labels = set()
    for item in dataset:
        pixels = item["pixel_values"]
        assert pixels.shape == (3, resolution, resolution) and pixels.dtype == torch.float32
        assert pixels.min() >= -1.0 and pixels.max() <= 1.0
        assert manifest.label_map[item["path"].split("/")[0]] == item["user_index"]
        labels.add(item["user_index"])
    assert labels == {0, 1, 2}
    grey = next(item for item in dataset if item["path"].startswith("user_03"))["pixel_values"]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


def test_dataset_keeps_pixels_at_native_resolution(tmp_path):
    path = write_image(tmp_path / "ID_1" / "a.png", "RGB", size=(8, 8))
    manifest = build_manifest(tmp_path, val_fraction=0, test_fraction=0)
    pixels = SpectrogramDataset(tmp_path, manifest, "train", 8)[0]["pixel_values"]
    expected = torch.from_numpy(np.asarray(Image.open(path), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
    assert torch.allclose(pixels, expected)


def test_dataset_serves_decoded_images_from_memory_within_its_budget(tmp_path, monkeypatch):
    paths = [write_image(tmp_path / "ID_1" / f"{k}.png", "RGB", size=(12, 12), seed=k) for k in range(3)]
    manifest = build_manifest(tmp_path, val_fraction=0, test_fraction=0)
    monkeypatch.setattr(SpectrogramDataset, "cache_bytes", 2 * 3 * 8 * 8)  # room for two 8x8 images
    dataset = SpectrogramDataset(tmp_path, manifest, "train", 8)
    first = [dataset[k] for k in range(3)]
    for path in paths:
        path.unlink()
    again = [dataset[k] for k in range(3)]
    for k in range(2):  # kept: the same values without the file
        assert again[k]["path"] == first[k]["path"] and torch.equal(again[k]["pixel_values"], first[k]["pixel_values"])
    assert again[2]["path"] != first[2]["path"]  # over the budget: read again, gone, replaced by a readable item


def test_palette_and_16bit_images_become_rgb(tmp_path):
    write_image(tmp_path / "ID_1" / "palette.png", "P")
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    Image.fromarray(ramp).save(tmp_path / "ID_1" / "deep.tif")
    manifest = build_manifest(tmp_path, val_fraction=0, test_fraction=0)
    dataset = SpectrogramDataset(tmp_path, manifest, "train", 8)
    deep = next(item for item in dataset if item["path"].endswith("deep.tif"))["pixel_values"]
    assert len(deep.unique()) == 64  # scaled from 16 bits, not clipped at 255
    assert deep.max() == pytest.approx(round(63000 / 257) / 127.5 - 1)
    assert all(item["pixel_values"].shape == (3, 8, 8) for item in dataset)


def test_dataset_skips_a_file_broken_after_the_manifest(mixed_dataset, caplog):
    manifest = build_manifest(mixed_dataset, val_fraction=0, test_fraction=0)
    dataset = SpectrogramDataset(mixed_dataset, manifest, "train", 16)
    (mixed_dataset / "ID_1" / "img_0.png").write_bytes(b"garbage")
    item = dataset[0]
    assert item["path"] == "ID_1/img_1.png"
    assert "img_0.png" in caplog.text
    assert len([dataset[i] for i in range(len(dataset))]) == 17


def test_summary_grid(mixed_dataset, tmp_path):
    result = run_cli(
        "-m", "utils.data_loader", "--data_dir", mixed_dataset, "--resolution", 20,
        "--grid", tmp_path / "grid.png", "--grid_users", 2, "--grid_images", 3,
    )
    assert result.returncode == 0, result.stderr
    grid = Image.open(tmp_path / "grid.png")
    assert grid.height == 2 * (20 + 2) + 2  # two user rows of 20 px cells
    inside = run_cli("-m", "utils.data_loader", "--data_dir", mixed_dataset, "--grid", mixed_dataset / "g.png")
    assert inside.returncode == 2 and not (mixed_dataset / "g.png").exists()
