"""Set-level metrics against answers computed by hand."""

import numpy as np
import pytest
import torch

from utils.distribution import frechet_distance, memorisation, paired_interval, prdc


def test_frechet_distance_of_a_set_with_itself_is_zero():
    features = np.random.default_rng(0).normal(size=(500, 8))
    assert abs(frechet_distance(features, features)) < 1e-6


def test_frechet_distance_of_an_affine_copy():
    # b = 2a + 3: mu_b = 2 mu + 3 and S_b = 4 S, so (S^1/2 S_b S^1/2)^1/2 = 2 S and
    # FD = ||mu + 3||^2 + Tr(S + 4S - 4S) = ||mu + 3||^2 + Tr(S).
    a = np.random.default_rng(1).normal(size=(400, 5)) @ np.diag([1, 2, 0.5, 1, 3])
    expected = ((a.mean(0) + 3) ** 2).sum() + np.trace(np.cov(a, rowvar=False))
    assert frechet_distance(a, 2 * a + 3) == pytest.approx(expected, rel=1e-9)


def test_prdc_hand_computed_case():
    # 1-D, k = 1. Real 0, 1, 3: ball radii 1, 1, 2. Fake 0.5, 10: radii 9.5, 9.5.
    # Fake 0.5 lies in the balls of 0 and 1, fake 10 in none -> precision 1/2, density (2 + 0) / 2 = 1.
    # Every real lies within 9.5 of fake 0.5 -> recall 1. Balls of 0 and 1 hold a fake, that of 3
    # (nearest fake 2.5 > 2) does not -> coverage 2/3.
    result = prdc([[0.0], [1.0], [3.0]], [[0.5], [10.0]], k=1)
    assert result == pytest.approx({"precision": 0.5, "recall": 1.0, "density": 1.0, "coverage": 2 / 3})


def test_prdc_of_identical_sets_is_perfect_precision_and_coverage():
    features = np.random.default_rng(2).normal(size=(200, 4))
    result = prdc(features, features + 1e-9, k=5)
    assert result["precision"] == 1.0 and result["coverage"] == 1.0 and result["recall"] == 1.0


def test_prdc_needs_more_samples_than_k():
    with pytest.raises(ValueError):
        prdc([[0.0]] * 5, [[0.0]] * 10, k=5)


def test_memorisation_counts_copies_of_training_images():
    rng = np.random.default_rng(3)
    train, test = torch.tensor(rng.normal(size=(100, 16))), torch.tensor(rng.normal(size=(50, 16)))
    novel = torch.tensor(rng.normal(size=(30, 16)))
    generated = torch.cat([train[:10] + 1e-3, novel])  # 10 near-copies among 40
    result = memorisation(generated, train, test, percentile=1.0)
    assert result["share"] == pytest.approx(10 / 40)
    assert result["nearest_train"][:10].tolist() == list(range(10))


def test_paired_interval_uses_the_t_distribution():
    result = paired_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, t(0.975, 2 df) = 4.3027
    assert result["mean"] == 2.0 and result["std"] == pytest.approx(1.0)
    assert result["ci_high"] - 2.0 == pytest.approx(4.302653 / np.sqrt(3), rel=1e-5)
    assert result["ci_low"] == pytest.approx(4.0 - result["ci_high"])
