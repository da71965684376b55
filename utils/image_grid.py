"""Overview grids of images with labels in a margin, never drawn onto an image."""

from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)


def labelled_grid(rows, row_labels, cell_size=None, gap=2, margin=None):
    """One PNG-ready image: each row of PIL images right of its label.

    rows: list of lists of PIL images (rows may differ in length);
    row_labels: one string per row, written in a white left margin;
    cell_size: side every image is resized to (default: the first image's width).
    """
    if len(rows) != len(row_labels):
        raise ValueError("one label per row")
    cell = cell_size or rows[0][0].width
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = max((measure.textlength(label, font=font) for label in row_labels), default=0)
    margin = margin if margin is not None else int(text_width) + 3 * gap + 4
    columns = max(len(row) for row in rows)
    grid = Image.new("RGB", (margin + columns * (cell + gap), len(rows) * (cell + gap) + gap), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for r, (row, label) in enumerate(zip(rows, row_labels)):
        top = gap + r * (cell + gap)
        draw.text((gap + 2, top + cell // 2), label, fill=TEXT, font=font, anchor="lm")
        for c, image in enumerate(row):
            if image.size != (cell, cell):
                image = image.resize((cell, cell), Image.Resampling.BICUBIC)
            grid.paste(image.convert("RGB"), (margin + c * (cell + gap), top))
    return grid


def to_pil(image):
    """A (3, H, W) tensor in [-1, 1] as an RGB PIL image."""
    array = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def to_pil_images(images_uint8):
    """(N, 3, H, W) uint8 tensors as RGB PIL images."""
    return [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images_uint8]
