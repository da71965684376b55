"""Set-level comparisons of real and generated images: Frechet distance, precision /
recall / density / coverage, nearest-neighbour memorisation, and a paired confidence
interval. Inputs are feature (or flattened pixel) matrices of shape (N, D).
"""

import numpy as np
import torch
from scipy import stats


def frechet_distance(features_a, features_b):
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) between Gaussian fits
    (Heusel et al. 2017, eq. for FID), in float64. The trace of the matrix square root is
    the sum of the square roots of the eigenvalues of the symmetric S_a^1/2 S_b S_a^1/2."""
    a, b = (np.asarray(f, dtype=np.float64) for f in (features_a, features_b))
    if len(a) < 2 or len(b) < 2:
        raise ValueError("the Frechet distance needs at least two samples per set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    values, vectors = np.linalg.eigh(cov_a)
    sqrt_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    cross = np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a)
    trace_sqrt = np.sqrt(np.clip(cross, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt)


def kth_neighbour_radii(features, k):
    """Distance of each point to its k-th nearest other point of the same set."""
    distances = torch.cdist(features, features)
    # k + 1: the smallest distance in each row is the point to itself (0).
    return distances.kthvalue(k + 1, dim=1).values


def prdc(real_features, fake_features, k=5):
    """Precision, recall, density and coverage of Naeem et al. 2020 ("Reliable Fidelity and
    Diversity Metrics for Generative Models"), with k-nearest-neighbour balls:

        precision = share of fakes inside some real ball
        recall    = share of reals inside some fake ball
        density   = (1/k) mean over fakes of the number of real balls containing it
        coverage  = share of real balls that contain at least one fake
    """
    real = torch.as_tensor(np.asarray(real_features), dtype=torch.float64)
    fake = torch.as_tensor(np.asarray(fake_features), dtype=torch.float64)
    if len(real) <= k or len(fake) <= k:
        raise ValueError(f"PRDC with k={k} needs more than {k} real and {k} generated samples")
    real_radii, fake_radii = kth_neighbour_radii(real, k), kth_neighbour_radii(fake, k)
    distances = torch.cdist(real, fake)  # (real, fake)
    inside_real = distances < real_radii[:, None]
    return {
        "precision": inside_real.any(0).double().mean().item(),
        "recall": (distances < fake_radii[None, :]).any(1).double().mean().item(),
        "density": inside_real.sum(0).double().mean().item() / k,
        "coverage": (distances.min(1).values < real_radii).double().mean().item(),
    }


def nearest_distances(queries, references, batch_size=512):
    """(distance, index) of each query's nearest reference, L2, computed in chunks."""
    references = torch.as_tensor(references, dtype=torch.float32)
    distances, indices = [], []
    for start in range(0, len(queries), batch_size):
        d = torch.cdist(torch.as_tensor(queries[start:start + batch_size], dtype=torch.float32), references)
        value, index = d.min(1)
        distances.append(value)
        indices.append(index)
    return torch.cat(distances), torch.cat(indices)


def memorisation(generated, train, test, percentile=1.0):
    """Share of generated samples whose nearest train sample is closer than the
    `percentile`-th percentile of the real test samples' nearest-train distances: a
    generated image that close to a training image is nearer than almost any real,
    unseen image gets, i.e. likely a copy."""
    test_distances, _ = nearest_distances(test, train)
    threshold = float(np.percentile(test_distances.numpy(), percentile))
    generated_distances, nearest = nearest_distances(generated, train)
    return {
        "threshold": threshold,
        "share": (generated_distances < threshold).float().mean().item(),
        "distances": generated_distances,
        "nearest_train": nearest,
    }


def paired_interval(differences, confidence=0.95):
    """Mean, standard deviation and the two-sided t confidence interval of paired differences."""
    d = np.asarray(differences, dtype=np.float64)
    mean = float(d.mean())
    if len(d) < 2:
        return {"mean": mean, "std": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": len(d)}
    std = float(d.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, len(d) - 1)) * std / np.sqrt(len(d))
    return {"mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half, "n": len(d)}
