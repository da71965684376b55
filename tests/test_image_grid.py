import numpy as np
from PIL import Image

from utils.image_grid import labelled_grid


def test_labels_go_in_the_margin_and_images_stay_untouched():
    rng = np.random.default_rng(0)
    images = [[Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(3)] for _ in range(2)]
    grid = labelled_grid(images, ["ID_1", "a_much_longer_user_name"], gap=2)
    pixels = np.asarray(grid)
    margin = grid.width - 3 * (16 + 2)
    assert margin > 0
    assert grid.height == 2 * (16 + 2) + 2
    for r, row in enumerate(images):
        for c, image in enumerate(row):
            top, left = 2 + r * 18, margin + c * 18
            assert np.array_equal(pixels[top:top + 16, left:left + 16], np.asarray(image))
    assert (pixels[:, :margin] < 128).any()  # the labels are written somewhere in the margin
