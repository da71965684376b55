"""Splits of real recordings: by group, as a lab's CSV, with a fixed test folder; the leak check; balanced accuracy."""

import json
import random

import pytest
import torch

from conftest import run_cli, write_image
from utils import leakage
from utils.classifier import balanced
from utils.cli import UsageError
from utils.data_loader import DatasetManifest, SpectrogramDataset, build_manifest, scan_dataset

PATTERN = r"(.*)_\d+\.png$"


def recordings_dataset(root, users=3, recordings=5, windows=4):
    """User folders of windows named <user>_rec<r>_<w>.png: each recording a group."""
    for u in range(1, users + 1):
        for r in range(recordings):
            for w in range(windows):
                write_image(root / f"ID_{u}" / f"ID_{u}_rec{r}_{w}.png", size=(16, 16), seed=100 * u + 10 * r + w)
    return root


def group_of(manifest, user, name):
    return manifest.groups[user][name]


def test_a_group_goes_wholly_to_one_split(tmp_path):
    data = recordings_dataset(tmp_path / "data")
    manifest = build_manifest(data, group_pattern=PATTERN)
    for user in manifest.users:
        sides = {}
        for split in ("train", "val", "test"):
            for name in manifest.splits[split][user]:
                sides.setdefault(group_of(manifest, user, name), set()).add(split)
        assert all(len(s) == 1 for s in sides.values()), sides
        assert len(sides) == 5 and manifest.count("train", user) > 0
        assert manifest.count("test", user) == 4 and manifest.count("val", user) == 4  # one recording each
    assert manifest.groups["ID_1"]["ID_1_rec3_2.png"] == "ID_1/ID_1_rec3"
    assert build_manifest(data, group_pattern=PATTERN).splits == manifest.splits  # deterministic for a seed
    assert any(build_manifest(data, group_pattern=PATTERN, seed=s).splits != manifest.splits for s in range(1, 6))


def test_grouping_ignores_the_listing_order(tmp_path):
    data = recordings_dataset(tmp_path / "data")
    scan = scan_dataset(data)
    expected = build_manifest(data, group_pattern=PATTERN, scan=scan).splits
    for names in scan.files.values():
        random.Random(0).shuffle(names)
    assert build_manifest(data, group_pattern=PATTERN, scan=scan).splits == expected


def test_groups_from_a_csv_equal_the_pattern(tmp_path):
    data = recordings_dataset(tmp_path / "data")
    table = tmp_path / "groups.csv"
    lines = ["file,group"] + [f"{p.parent.name}/{p.name},{p.stem.rsplit('_', 1)[0]}" for p in sorted(data.glob("*/*.png"))]
    table.write_text("\n".join(lines))
    by_csv, by_pattern = build_manifest(data, groups_csv=table), build_manifest(data, group_pattern=PATTERN)
    assert by_csv.splits == by_pattern.splits and by_csv.grouping == "csv"
    table.write_text("\n".join(lines[:-1]))  # one image without a group
    with pytest.raises(UsageError, match="1 images are not listed"):
        build_manifest(data, groups_csv=table)


def test_too_few_groups_are_named_or_split_in_time_blocks(tmp_path):
    data = recordings_dataset(tmp_path / "data", users=2, recordings=2, windows=10)
    with pytest.raises(UsageError, match=r"2 users have too few groups.*ID_1 \(2\), ID_2 \(2\).*--few_groups blocks"):
        build_manifest(data, group_pattern=PATTERN)
    manifest = build_manifest(data, group_pattern=PATTERN, few_groups="blocks")
    assert manifest.blocked_users == ["ID_1", "ID_2"]
    # Per recording of 10 windows: the first 7 train, window 7 val, the last two test.
    assert manifest.splits["test"]["ID_1"] == ["ID_1_rec0_8.png", "ID_1_rec0_9.png", "ID_1_rec1_8.png", "ID_1_rec1_9.png"]
    assert manifest.splits["val"]["ID_1"] == ["ID_1_rec0_7.png", "ID_1_rec1_7.png"]
    assert "time blocks" in manifest.describe()


def test_a_pattern_that_misses_files_is_a_usage_error(tmp_path):
    data = recordings_dataset(tmp_path / "data", users=1)
    write_image(data / "ID_1" / "odd.png", size=(16, 16))
    with pytest.raises(UsageError, match=r"matches no part of 1 file paths \(ID_1/odd.png\)"):
        build_manifest(data, group_pattern=PATTERN)
    with pytest.raises(UsageError, match="not a regular expression"):
        build_manifest(data, group_pattern="(")


def test_split_csv_is_the_lab_protocol(tmp_path):
    data = recordings_dataset(tmp_path / "data", users=2, recordings=3, windows=2)
    files = sorted(f"{p.parent.name}/{p.name}" for p in data.glob("*/*.png"))
    splits = {f: "test" if "_rec2_" in f else "val" if "_rec1_" in f else "train" for f in files}
    table = tmp_path / "split.csv"
    table.write_text("\n".join(f"{f},{s}" for f, s in splits.items()))
    manifest = build_manifest(data, split_csv=table)
    assert {f"{u}/{n}": s for s in ("train", "val", "test") for u, names in manifest.splits[s].items() for n in names} == splits
    saved = tmp_path / "m.json"
    manifest.save(saved)
    assert DatasetManifest.load(saved).describe() == f"as given by --split_csv {table}"
    table.write_text("\n".join(f"{f},{'holdout' if s == 'test' else s}" for f, s in splits.items()))
    with pytest.raises(UsageError, match="unknown split names holdout"):
        build_manifest(data, split_csv=table)


def test_a_fixed_test_folder(tmp_path):
    data = recordings_dataset(tmp_path / "data", users=3, recordings=3)
    test_dir = recordings_dataset(tmp_path / "test", users=2, recordings=1)
    manifest = build_manifest(data, test_dir=test_dir)
    assert manifest.splits["test"] == {"ID_1": [f"ID_1_rec0_{w}.png" for w in range(4)],
                                      "ID_2": [f"ID_2_rec0_{w}.png" for w in range(4)], "ID_3": []}
    assert manifest.count("train", "ID_1") + manifest.count("val", "ID_1") == 12  # the data folder: train and val only
    manifest.check_matches(data)
    test = SpectrogramDataset(data, manifest, "test", 16)
    assert test[0]["path"] == "ID_1/ID_1_rec0_0.png" and test.root == test_dir.resolve()
    (test_dir / "ID_1" / "ID_1_rec0_0.png").unlink()
    with pytest.raises(UsageError, match="listed files are missing"):
        manifest.check_matches(data)
    other = build_manifest(data)
    assert "different folders" in manifest.split_mismatch(other)


@pytest.mark.parametrize("case", ["unknown_user", "empty"])
def test_a_bad_test_folder_exits_2_and_writes_nothing(tmp_path, case):
    data = recordings_dataset(tmp_path / "data", users=2, recordings=3)
    test_dir = tmp_path / "test"
    if case == "unknown_user":
        write_image(test_dir / "ID_9" / "a.png", size=(16, 16))
    else:
        (test_dir / "ID_1").mkdir(parents=True)
    out = tmp_path / "m.json"
    result = run_cli("-m", "utils.data_loader", "--data_dir", data, "--test_dir", test_dir, "--manifest_out", out)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert ("ID_9" if case == "unknown_user" else "no readable image") in result.stderr
    assert not out.exists()


def test_summary_shows_groups_and_split_and_the_manifest_keeps_them(tmp_path):
    data = recordings_dataset(tmp_path / "data")
    out = tmp_path / "m.json"
    result = run_cli("-m", "utils.data_loader", "--data_dir", data, "--group_pattern", PATTERN, "--manifest_out", out,
                     "--resolution", 16)
    assert result.returncode == 0, result.stderr
    assert f"split by group (--group_pattern {PATTERN})" in result.stdout
    line = next(line for line in result.stdout.splitlines() if " ID_2 " in line)
    assert line.split()[3:] == ["20", "5", "12", "4", "4"]  # images, groups, train, val, test
    stored = json.loads(out.read_text())
    assert stored["grouping"] == "pattern" and stored["groups"]["ID_2"]["ID_2_rec0_0.png"] == "ID_2/ID_2_rec0"
    again = run_cli("-m", "utils.data_loader", "--data_dir", data, "--manifest", out, "--group_pattern", PATTERN)
    assert again.returncode == 2 and "give one or the other" in again.stderr


def shifted_windows(recordings, windows, seed, width=64):
    """(images uint8 (N, 3, 64, 64), labels, recording of each): windows of random
    recordings of one user, each window half a width after the previous one."""
    generator = torch.Generator().manual_seed(seed)
    images, recording_of = [], []
    for r in range(recordings):
        strip = torch.randint(0, 256, (64, width * (windows + 1) // 2), generator=generator, dtype=torch.uint8)
        for w in range(windows):
            images.append(strip[:, w * width // 2:w * width // 2 + width])
            recording_of.append(r)
    x = torch.stack(images)[:, None].repeat(1, 3, 1, 1)
    return x, torch.zeros(len(x), dtype=torch.long), recording_of


def test_leak_check_fires_on_cut_recordings_and_stays_quiet_on_a_grouped_split():
    images, labels, recording_of = shifted_windows(recordings=8, windows=6, seed=0)
    paths = [f"ID_1/w{i}.png" for i in range(len(labels))]
    leaky_test = [i for i in range(len(labels)) if i % 6 in (1, 4)]  # windows whose neighbours are in train
    clean_test = [i for i in range(len(labels)) if recording_of[i] in (0, 1)]  # two whole recordings

    def check(test):
        train = [i for i in range(len(labels)) if i not in test]
        return leakage.leak_check((images[train], labels[train]), (images[test], labels[test]),
                                  [paths[i] for i in train], [paths[i] for i in test])

    leaky, clean = check(leaky_test), check(clean_test)
    assert leaky["flagged"] and leaky["near_copies"] == len(leaky_test) and "LEAK CHECK" in leaky["message"]
    assert leaky["closest"][0]["distance"] < 0.01
    assert int(leaky["closest"][0]["train"][6:-4]) in {int(leaky["closest"][0]["test"][6:-4]) + d for d in (-1, 1)}
    assert not clean["flagged"] and clean["near_copies"] == 0 and "no sign" in clean["message"]


def test_leak_check_is_quiet_on_independent_images():
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (60, 3, 64, 64), generator=generator, dtype=torch.uint8)
    labels = torch.arange(60) % 3
    paths = [f"u/{i}.png" for i in range(60)]
    report = leakage.leak_check((images[:45], labels[:45]), (images[45:], labels[45:]), paths[:45], paths[45:])
    assert not report["flagged"] and report["near_copies"] == 0


def test_balanced_accuracy_by_hand():
    labels = torch.tensor([0, 0, 0, 0, 1, 2, 2])
    predicted = torch.tensor([0, 0, 0, 1, 0, 2, 0])
    # Per user: 3/4, 0/1, 1/2 -> balanced (0.75 + 0 + 0.5) / 3; plain accuracy 4/7.
    assert balanced(predicted, labels) == pytest.approx(1.25 / 3)
    assert (predicted == labels).float().mean().item() == pytest.approx(4 / 7)


def test_balanced_sampling_draws_every_user_equally_often():
    from utils.training import EpochSampler, user_weights

    labels = torch.tensor([0] * 90 + [1] * 10)
    assert user_weights(labels)[[0, 95]].tolist() == [1 / 90, 1 / 10]
    sampler = EpochSampler(len(labels), seed=3, weights=user_weights(labels))
    drawn = torch.tensor([i for epoch in range(20) for i in (sampler.set_epoch(epoch), list(sampler))[1]])
    share = (labels[drawn] == 1).float().mean().item()
    assert 0.45 < share < 0.55  # 10% of the images, half of the draws
    sampler.set_epoch(4)
    assert list(sampler) == list(sampler)  # an epoch's order depends on (seed, epoch) only: resume replays it
    assert sorted(EpochSampler(len(labels), seed=3)) == list(range(100))  # unweighted: every image once


def test_a_classifier_with_balanced_users_trains():
    from utils.classifier import train_classifier

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 16, 16), generator=generator, dtype=torch.uint8)
    labels = torch.tensor([0] * 34 + [1] * 6)
    settings = dict(widths=(4, 8), depths=(1, 1), batch_size=8, learning_rate=1e-3, weight_decay=0.0,
                    max_train_steps=4, eval_every=2, patience=2, balance_users=True)
    model, history = train_classifier((images, labels), (images[:4], labels[:4]), ["a", "b"], settings, seed=0,
                                      progress=False)
    assert history["steps_run"] == 4


def test_split_sources_that_contradict_each_other_are_usage_errors(tmp_path):
    import argparse

    from utils.data_loader import stage_manifest

    data = recordings_dataset(tmp_path / "data", users=2, recordings=3)
    table = tmp_path / "split.csv"
    table.write_text("ID_1/ID_1_rec0_0.png,train\n")
    with pytest.raises(UsageError, match="--split_csv gives the whole split"):
        build_manifest(data, split_csv=table, group_pattern=PATTERN)
    with pytest.raises(UsageError, match="give one"):
        build_manifest(data, group_pattern=PATTERN, groups_csv=table)
    args = argparse.Namespace(manifest=None, split_seed=None, val_fraction=None, test_fraction=0.3, group_pattern=None,
                              groups_csv=None, few_groups=None, split_csv=None, test_dir=str(data), train_images_per_user=None)
    with pytest.raises(UsageError, match="--test_dir is the test set; --test_fraction"):
        stage_manifest(args, data)
