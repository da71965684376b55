"""The evaluation protocol's pieces with known answers: budgets, paired rows, verdicts,
labels, and the classic augmentation."""

import math

import pytest
import torch

from conftest import write_image
from utils.augment import background_colour, classic_augmentation, mask_bands, mixup_within_user
from utils.cli import UsageError
from utils.data_loader import build_manifest
from utils.evaluation import ROWS, gain_colours, generator_label, protocol_jobs, steps_for, verdict
from utils.presets import CLASSIC_AUGMENTATION


@pytest.fixture
def twelve_per_user(tmp_path):
    for user in ("ID_1", "ID_2", "ID_3"):
        for k in range(12):
            write_image(tmp_path / "data" / user / f"{k}.png", size=(8, 8), seed=k)
    return tmp_path / "data"


def test_a_budget_keeps_n_train_images_per_user_and_leaves_val_and_test(twelve_per_user):
    full = build_manifest(twelve_per_user, seed=4)
    five = full.restricted(5)
    assert five.train_counts() == [5, 5, 5] and five.train_images_per_user == 5
    for split in ("val", "test"):
        assert five.splits[split] == full.splits[split]
    for user in full.users:  # the rest of the train split is kept aside, not lost
        assert sorted(five.splits["train"][user] + five.unused[user]) == sorted(full.splits["train"][user])
    assert five == build_manifest(twelve_per_user, seed=4).restricted(5)  # deterministic for a seed
    assert five.restricted(5) == five and full.restricted(3).splits == five.restricted(3).splits  # nested
    assert full.restricted(3).files(["train"]) < five.files(["train"])
    assert build_manifest(twelve_per_user, seed=5).restricted(5).files(["train"]) != five.files(["train"])
    five.check_matches(twelve_per_user)  # the unused images still belong to the manifest
    assert "one keeps 5 train images per user, the other every train image" in five.split_mismatch(full)
    with pytest.raises(UsageError):
        full.restricted(0)


def test_every_row_of_a_seed_trains_on_the_same_real_images_from_the_same_start():
    train = (torch.arange(12).view(12, 1, 1, 1).expand(12, 3, 2, 2).to(torch.uint8), torch.arange(12) % 3)
    generated = (torch.full((6, 3, 2, 2), 200, dtype=torch.uint8), torch.arange(6) % 3)
    val = (train[0][:3], train[1][:3])
    jobs = protocol_jobs(train, val, generated, ["all", "2"], seeds=2, classic={"time_masks": 1}, max_train_steps=100)
    assert len(jobs) == len(ROWS) * 2 * 2
    for budget, steps in (("all", 100), ("2", 50)):  # half the real images: half the steps
        subsets = []
        for seed in range(2):
            real = jobs["real", budget, seed]
            assert real.seed == seed and real.augmentation is None
            for row in ROWS:
                job = jobs[row, budget, seed]
                assert job.seed == seed and job.val is val and job.max_train_steps == steps
                assert torch.equal(job.train[0][:len(real.train[0])], real.train[0])  # the same real images first
                assert len(job.train[1]) == len(real.train[1]) + (6 if "generated" in row else 0)
                assert (job.augmentation is not None) == ("classic" in row)
            subsets.append(real.train[1].bincount(minlength=3).tolist())
        assert subsets == ([[4, 4, 4]] * 2 if budget == "all" else [[2, 2, 2]] * 2)
    assert not torch.equal(jobs["real", "2", 0].train[0], jobs["real", "2", 1].train[0])  # another subset per seed


def test_steps_follow_the_real_images_with_a_floor():
    assert steps_for(3255, 3255, 250) == 250 and steps_for(310, 3255, 250) == 62 and steps_for(1600, 3200, 100) == 50


@pytest.mark.parametrize("low, high, word", [(0.01, 0.05, "helps"), (-0.05, -0.01, "hurts"),
                                             (-0.02, 0.03, "no measurable effect"), (0.0, 0.04, "no measurable effect"),
                                             (math.nan, math.nan, "not measured (one seed)")])
def test_verdict_words(low, high, word):
    assert verdict({"ci_low": low, "ci_high": high}) == word


def test_per_user_colours_tie_when_the_means_differ_only_in_float32_rounding():
    # ID_6 of a quick run: 103 of 150 test images in both rows, 5 seeds averaged in another order.
    real = [0.6866666793823242, 0.60, 0.80]
    augmented = [0.6866666674613953, 0.62, 0.78]
    assert gain_colours(real, augmented) == ["C7", "C2", "C3"]


def test_budgets_below_what_the_generator_saw_are_labelled():
    assert generator_label("all", [105, 105])["generator_saw_more"] is False
    assert generator_label("105", [105, 105])["generator_saw_more"] is False
    below = generator_label("10", [105, 104])
    assert below["generator_saw_more"] is True
    assert below["label"] == "generator saw more real data: up to 105 train images per user, not 10"
    assert generator_label("10", [10, 10])["label"] == "the generator saw the same real images: 10 per user"
    assert generator_label("10", None)["generator_saw_more"] is None


def test_masks_fill_bands_with_the_background_and_keep_the_rest():
    images = torch.full((2, 3, 10, 20), -0.8)
    images[:, :, 4:6, :] = 0.9  # a bright band on a dark background
    masked = mask_bands(images, count=1, max_share=0.5, dim=3, generator=torch.Generator().manual_seed(0))
    changed = (masked != images).any(1).any(1)  # (B, W): masked time columns
    assert changed.any() and (changed.sum(1) < 10).all()
    assert torch.allclose(masked[:, :, 4:6][~changed[:, None, None, :].expand(2, 3, 2, 20)], torch.tensor(0.9))
    assert torch.equal(background_colour(images).flatten(), torch.full((6,), -0.8))
    assert ((masked == -0.8) | (masked == 0.9)).all()  # filled with the background, nothing else
    assert torch.equal(mask_bands(images, 0, 0.5, 3), images)


def test_mixup_within_a_user_blends_towards_the_partner_only():
    images, partners = torch.zeros(64, 3, 4, 4), torch.ones(64, 3, 4, 4)
    mixed = mixup_within_user(images, partners, alpha=0.4, probability=0.5, generator=torch.Generator().manual_seed(0))
    weights = mixed[:, 0, 0, 0]
    assert torch.equal(mixed, weights.view(-1, 1, 1, 1).expand_as(mixed))  # one blend weight per image
    assert 10 < (weights == 0).sum() < 54 and ((weights >= 0) & (weights <= 1)).all()
    assert torch.equal(mixup_within_user(images, partners, 0.4, 0.0), images)


def test_classic_augmentation_is_deterministic_for_a_generator():
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    partners = torch.rand(4, 3, 16, 16) * 2 - 1
    every_part = {**CLASSIC_AUGMENTATION, "time_masks": 1, "frequency_masks": 1, "mixup_probability": 0.5}
    a = classic_augmentation(images, partners, every_part, torch.Generator().manual_seed(3))
    b = classic_augmentation(images, partners, every_part, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, images) and a.shape == images.shape


def test_a_classifier_trains_under_bf16_autocast_and_keeps_fp32_weights():
    from utils.classifier import resolve_precision, train_classifier
    from utils.training import cpu_computes_bf16

    assert resolve_precision("auto", "cpu") == ("bf16" if cpu_computes_bf16() else "no")
    assert resolve_precision("no", "cpu") == "no" and resolve_precision("bf16", "cpu") == "bf16"
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1] * 16)
    images = (torch.randint(0, 60, (32, 3, 16, 16), generator=generator) + 190 * labels.view(-1, 1, 1, 1)).to(torch.uint8)
    settings = dict(widths=(4, 8), depths=(1, 1), batch_size=16, learning_rate=1e-2, weight_decay=0.0,
                    max_train_steps=30, eval_every=10, patience=3, mixed_precision="bf16")
    model, history = train_classifier((images, labels), (images, labels), ["dark", "bright"], settings, seed=0,
                                      progress=False)
    assert history["best_val_accuracy"] == 1.0  # dark vs bright: any working training separates them
    assert all(p.dtype == torch.float32 for p in model.parameters())
