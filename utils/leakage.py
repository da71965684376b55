"""Leak check: do test images have near-copies among the train images?

Real spectrogram datasets are windows cut from a few recordings, often overlapping in
time. Split at random by image, a test window's neighbours of the same recording sit in
train, and every test number measures recall of the recording. The check compares, per
user, each test image's distance to its nearest train image with the typical distance of
a test image to its nearest *other test* image: images that are independent draws (or a
split that keeps each recording on one side) give ratios near 1; a split that cuts
recordings gives many test images far closer to train than to anything else.

The distance tolerates a window cut a little later: 1 minus the best Pearson correlation
of the two images' overlapping columns over time shifts of up to three quarters of the
width (columns are time, rows Doppler, as everywhere in this project), in grey at
CHECK_SIZE x CHECK_SIZE.
"""

import torch
import torch.nn.functional as F

CHECK_SIZE = 64
MAX_SHIFT = 0.75  # of the width: windows that overlap by a quarter still align
NEAR_COPY = 0.2  # a near-copy: closer to train than a fifth of the typical test-to-test distance
FLAG_SHARE = 0.1  # the check fires when at least this share of the test images have one


def grey(images_uint8):
    """(N, 3, R, R) uint8 -> (N, S, S) float grey at CHECK_SIZE (area-averaged)."""
    x = images_uint8.float().mean(dim=1, keepdim=True)
    if x.shape[-1] != CHECK_SIZE:
        x = F.interpolate(x, size=(CHECK_SIZE, CHECK_SIZE), mode="area")
    return x[:, 0]


def _overlap_sums(x, shifts, first):
    """Per image and shift: (sum, sum of squares) over its columns that overlap the other
    image: columns s.. (s >= 0) or ..W + s of the first image, the mirror for the second."""
    width = x.shape[-1]
    zero = torch.zeros(len(x), 1, dtype=x.dtype)
    prefix = [torch.cat([zero, v.sum(dim=1).cumsum(dim=1)], dim=1) for v in (x, x * x)]  # (N, W + 1)
    start = (shifts if first else -shifts).clamp(min=0)
    end = start + width - shifts.abs()
    return [p[:, end] - p[:, start] for p in prefix]


def shift_distance(a, b):
    """(Na, Nb): 1 - the best Pearson correlation of a[i] and b[j] over column shifts s
    (a[:, s:] against b[:, :W - s], and the mirror for s < 0), computed for every shift at
    once from FFT cross-correlations and prefix sums."""
    a, b = a.double(), b.double()
    rows, width = a.shape[-2:]
    size = 2 * width  # zero padding: linear, not circular, correlation
    # resolve_conj: einsum on a lazily conjugated tensor takes a path 30x slower.
    spectrum = torch.einsum("irf,jrf->ijf", torch.fft.rfft(a, n=size), torch.fft.rfft(b, n=size).conj().resolve_conj())
    cross = torch.fft.irfft(spectrum, n=size)  # (Na, Nb, size): index k (k >= 0) or size + k (k < 0) is shift k
    limit = int(MAX_SHIFT * width)
    shifts = torch.arange(-limit, limit + 1)
    cross = cross[:, :, shifts % size]
    sum_a, square_a = (v[:, None, :] for v in _overlap_sums(a, shifts, first=True))
    sum_b, square_b = (v[None, :, :] for v in _overlap_sums(b, shifts, first=False))
    count = (rows * (width - shifts.abs())).double()
    covariance = cross - sum_a * sum_b / count
    variance = (square_a - sum_a ** 2 / count) * (square_b - sum_b ** 2 / count)
    correlation = covariance / variance.clamp_min(1e-12).sqrt()
    return (1.0 - correlation.max(dim=2).values).float()


def leak_check(train, test, train_paths, test_paths, shown=8):
    """Compare each test image's nearest train image (same user) with its nearest other
    test image. `train` and `test` are (images uint8, labels); returns a plain dict with a
    one-line `message`, and `pairs`: (test index, train index) of the closest cases."""
    train_images, train_labels = grey(train[0]), train[1]
    test_images, test_labels = grey(test[0]), test[1]
    to_train = torch.full((len(test_labels),), float("nan"))
    to_test = torch.full((len(test_labels),), float("nan"))
    nearest = torch.full((len(test_labels),), -1, dtype=torch.long)
    for user in test_labels.unique().tolist():
        rows = (test_labels == user).nonzero().flatten()
        columns = (train_labels == user).nonzero().flatten()
        if len(columns):
            distance = shift_distance(test_images[rows], train_images[columns])
            to_train[rows], best = distance.min(dim=1)
            nearest[rows] = columns[best]
        if len(rows) > 1:
            within = shift_distance(test_images[rows], test_images[rows])
            within.fill_diagonal_(float("inf"))
            to_test[rows] = within.min(dim=1).values
    measured = ~to_train.isnan()
    typical = float(to_test[~to_test.isnan()].median()) if (~to_test.isnan()).any() else float("nan")
    report = {"test_images": len(test_labels), "checked": int(measured.sum()), "typical_test_distance": typical,
              "threshold": NEAR_COPY * typical, "flag_share": FLAG_SHARE, "near_copies": 0, "share": 0.0,
              "flagged": False, "closest": [], "pairs": []}
    if typical != typical or not measured.any():
        report["message"] = "leak check: too few test images per user to compare (needs two of a user)"
        return report
    near = measured & (to_train < report["threshold"])
    report["near_copies"] = int(near.sum())
    report["share"] = report["near_copies"] / int(measured.sum())
    report["flagged"] = report["share"] >= FLAG_SHARE and report["near_copies"] >= 3
    order = [int(i) for i in torch.argsort(torch.where(measured, to_train, float("inf")))[:shown] if measured[i]]
    report["pairs"] = [(i, int(nearest[i])) for i in order]
    report["closest"] = [{"test": test_paths[i], "train": train_paths[int(nearest[i])],
                          "distance": float(to_train[i])} for i in order]
    counted = f"{report['near_copies']} of {report['checked']} test images ({report['share']:.0%})"
    if report["flagged"]:
        report["message"] = (
            f"LEAK CHECK: {counted} have a near-copy in train (closer than a fifth of the typical test-to-test distance "
            f"{typical:.3f}): the split cuts recordings, and test numbers measure recall of them. Split by recording "
            "with --group_pattern or --groups_csv (or give --split_csv / --test_dir)")
    else:
        report["message"] = f"leak check: {counted} have a near-copy in train: no sign of recordings cut by the split"
    return report


def check_split(data_dir, manifest):
    """The leak check of a manifest's split, images loaded at CHECK_SIZE: (report, train, test)."""
    from utils.classifier import load_split

    train, test = (load_split(data_dir, manifest, split, CHECK_SIZE) for split in ("train", "test"))
    report = leak_check(train, test, [p for p, _ in manifest.samples("train")], [p for p, _ in manifest.samples("test")])
    return report, train, test


def pairs_grid(report, train_images, test_images, cell_size=96):
    """The closest cases side by side: each row a test image, then its nearest train image."""
    from PIL import Image

    from utils.image_grid import labelled_grid, to_pil_images

    rows = [to_pil_images(torch.stack([test_images[i], train_images[j]])) for i, j in report["pairs"]]
    labels = [f"{c['distance']:.3f}" for c in report["closest"]]
    return labelled_grid(rows or [[Image.new("RGB", (cell_size, cell_size), "white")]], labels or ["no pair"],
                         cell_size=cell_size)
