"""Labelled grids and the summary: every image shows up, upscaled exactly (nearest), under its column."""

import numpy as np
import pytest
from PIL import Image

from lvm.figures import (
    COLUMNS,
    MIN_SIDE,
    AnalogyExample,
    display_side,
    labelled_grid,
    reconstruction_figure,
    summary_figure,
    text_block,
)

SIZE = 32


def tile(index: int) -> Image.Image:
    """A random 32 px image whose top-left pixel is a colour no other tile (nor the text) has."""
    pixels = np.random.default_rng(index).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    pixels[0, 0] = (index, 255 - index, 7)
    return Image.fromarray(pixels)


def example(task: str, first: int) -> AnalogyExample:
    images = [tile(first + i) for i in range(10)]
    answers = dict(zip(("model", "copy_query", "no_context"), images[7:10], strict=True))
    return AnalogyExample(task, images[:6], images[6], answers, tile(first + 10))


def find(canvas: np.ndarray, image: Image.Image) -> tuple[int, int]:
    """(x, y) of `image`'s nearest-upscaled copy in the canvas, checked pixel for pixel."""
    side = display_side(SIZE)
    corner = np.asarray(image)[0, 0]
    ys, xs = np.nonzero((canvas == corner).all(-1))
    y, x = int(ys.min()), int(xs.min())
    expected = np.asarray(image).repeat(side // SIZE, 0).repeat(side // SIZE, 1)
    np.testing.assert_array_equal(canvas[y : y + side, x : x + side], expected)
    return x, y


def test_grid_rows_columns_and_header():
    rows = [example("edges", 0), example("edges", 20)]
    canvas = np.asarray(labelled_grid(rows, title="edges"))
    assert display_side(SIZE) >= MIN_SIDE and display_side(SIZE) % SIZE == 0
    positions = []
    for row in rows:  # one grid row per example, columns in COLUMNS order, left to right
        cells = [find(canvas, image) for section in row.sections() for image in section]
        assert len({y for _, y in cells}) == 1 and [x for x, _ in cells] == sorted(x for x, _ in cells)
        positions.append(cells[0][1])
    assert positions[1] - positions[0] >= display_side(SIZE)
    header = canvas[: positions[0]]
    assert (header.min(-1) < 100).sum() > 50  # dark text above the first row: the column names
    assert len(COLUMNS) == len(rows[0].sections())


def test_summary_puts_the_table_beside_the_rows():
    examples = {"edges": [example("edges", 0), example("edges", 20)], "recolor": [example("recolor", 40)]}
    table = ["task  PSNR", "edges  31.20", "recolor  28.00"]
    summary = summary_figure(examples, table, rows_per_task=1)
    canvas = np.asarray(summary)
    edges_x, edges_y = find(canvas, examples["edges"][0].query)
    recolor_x, recolor_y = find(canvas, examples["recolor"][0].query)
    assert recolor_y > edges_y and recolor_x == edges_x
    assert not ((canvas == np.asarray(examples["edges"][1].query)[0, 0]).all(-1)).any()  # only rows_per_task rows
    assert summary.width >= labelled_grid(examples["edges"][:1]).width + text_block(table).width
    with pytest.raises(ValueError, match="at least one"):
        summary_figure({"edges": []}, table)


def test_reconstructions_sit_under_their_originals():
    sets = {"photos": ([tile(0), tile(1)], [tile(2), tile(3)]), "edges 31.2 dB": ([tile(4)], [tile(5)])}
    canvas = np.asarray(reconstruction_figure(sets))
    for originals, decoded in sets.values():
        for above, below in zip(originals, decoded, strict=True):
            (x0, y0), (x1, y1) = find(canvas, above), find(canvas, below)
            assert x0 == x1 and y1 - y0 >= display_side(SIZE)
    assert (canvas[:, : find(canvas, tile(0))[0]].min(-1) < 100).sum() > 50  # the set names on the left
