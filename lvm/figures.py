"""Pictures a person reads at a glance: labelled analogy grids and a summary with its metrics table.

Demo images are tiny (32 px), so every image is upscaled with nearest neighbour (pixels stay sharp
squares, nothing is invented) to at least `MIN_SIDE` px. A grid has a header row naming its columns
and one row per held-out prompt:

    examples (x1 y1 x2 y2 ...) | query | model | copy query | no context | truth

    save_task_grids(examples, "runs/demo/grids")           # one PNG per task
    summary_figure(examples, table_lines, rows_per_task=2)   # a few rows per task + the table beside
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from lvm.prompting import save_png

MIN_SIDE = 96
COLUMNS = ("examples", "query", "model", "copy query", "no context", "truth")
GAP, SECTION_GAP, MARGIN = 4, 16, 12
FONT_SIZE = 16
INK, PAPER, RULE = (20, 20, 20), (255, 255, 255), (150, 150, 150)


@dataclass
class AnalogyExample:
    """One scored prompt: its example pairs, the query, each method's decoded answer, and the truth."""

    task: str
    examples: list[Image.Image]  # x1, y1, ..., xn, yn
    query: Image.Image
    answers: dict[str, Image.Image]  # method -> decoded answer (model, copy_query, no_context)
    truth: Image.Image

    def sections(self) -> list[list[Image.Image]]:
        """The images of each column in COLUMNS order."""
        methods = ("model", "copy_query", "no_context")
        return [self.examples, [self.query], *([self.answers[m]] for m in methods), [self.truth]]


def font(size: int = FONT_SIZE) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def display_side(size: int, least: int = MIN_SIDE) -> int:
    """The smallest whole multiple of `size` that is >= `least`: every source pixel becomes an equal square."""
    return size * max(1, -(-least // size))


def _section_widths(sections: Sequence[Sequence[Image.Image]], side: int) -> list[int]:
    return [len(s) * side + (len(s) - 1) * GAP for s in sections]


def labelled_grid(rows: Sequence[AnalogyExample], title: str | None = None) -> Image.Image:
    """Header row naming the columns, then one row per example; images upscaled (nearest) to >= MIN_SIDE px."""
    if not rows:
        raise ValueError("a grid needs at least one example row")
    side = display_side(rows[0].query.height)
    n_examples = max(len(r.examples) for r in rows)
    widths = _section_widths([[None] * n_examples, *[[None]] * (len(COLUMNS) - 1)], side)
    text = font()
    line = text.size + 8
    header = line * (2 if title else 1)
    width = 2 * MARGIN + sum(widths) + SECTION_GAP * (len(widths) - 1)
    height = 2 * MARGIN + header + len(rows) * (side + GAP)
    canvas = Image.new("RGB", (width, height), PAPER)
    draw = ImageDraw.Draw(canvas)
    y = MARGIN
    if title:
        draw.text((MARGIN, y), title, fill=INK, font=font(FONT_SIZE + 2))
        y += line
    x = MARGIN
    for name, w in zip(COLUMNS, widths, strict=True):  # column names centred over their sections
        draw.text((x + (w - draw.textlength(name, font=text)) / 2, y), name, fill=INK, font=text)
        x += w + SECTION_GAP
    y += line
    draw.line((MARGIN, y - 4, width - MARGIN, y - 4), fill=RULE)
    for row in rows:
        x = MARGIN
        for images, w in zip(row.sections(), widths, strict=True):
            for i, image in enumerate(images):
                canvas.paste(image.resize((side, side), Image.NEAREST), (x + i * (side + GAP), y))
            x += w + SECTION_GAP
        y += side + GAP
    return canvas


def save_task_grids(examples: Mapping[str, Sequence[AnalogyExample]], directory: str | os.PathLike) -> list[Path]:
    """One labelled grid per task, `<directory>/<task>.png`; returns the paths."""
    return [
        save_png(labelled_grid(rows, title=f"{task}: held-out prompts"), Path(directory) / f"{task}.png")
        for task, rows in examples.items()
        if rows
    ]


def text_block(lines: Sequence[str], size: int = FONT_SIZE) -> Image.Image:
    """Lines of monospaced-looking text (columns separated by runs of spaces are aligned) as an image."""
    face = font(size)
    cells = [line.split("  ") for line in lines]
    cells = [[c.strip() for c in row if c.strip()] for row in cells]
    n = max(map(len, cells), default=0)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    col = [max((probe.textlength(r[i], font=face) for r in cells if i < len(r)), default=0) for i in range(n)]
    pad, line = 18, size + 8
    canvas = Image.new("RGB", (int(sum(col) + pad * n) + 2 * MARGIN, line * len(lines) + 2 * MARGIN), PAPER)
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(cells):
        x = MARGIN
        for i, cell in enumerate(row):
            # the first column is left-aligned (names), the others right-aligned (numbers)
            offset = 0 if i == 0 else col[i] - draw.textlength(cell, font=face)
            draw.text((x + offset, MARGIN + r * line), cell, fill=INK, font=face)
            x += col[i] + pad
    return canvas


def summary_figure(
    examples: Mapping[str, Sequence[AnalogyExample]], table: Sequence[str], rows_per_task: int = 2
) -> Image.Image:
    """The first `rows_per_task` rows of each task's grid stacked, the metrics table drawn beside them."""
    grids = [
        labelled_grid(rows[:rows_per_task], title=task) for task, rows in examples.items() if rows
    ]
    if not grids:
        raise ValueError("the summary needs at least one task with examples")
    table_image = text_block(table)
    width = max(g.width for g in grids) + table_image.width
    height = max(sum(g.height for g in grids), table_image.height)
    canvas = Image.new("RGB", (width, height), PAPER)
    y = 0
    for grid in grids:
        canvas.paste(grid, (0, y))
        y += grid.height
    canvas.paste(table_image, (width - table_image.width, 0))
    return canvas


def reconstruction_figure(sets: Mapping[str, tuple[Sequence[Image.Image], Sequence[Image.Image]]]) -> Image.Image:
    """For each named set, its originals over their tokenizer reconstructions, upscaled (nearest), the
    set's name (and "original" / "decoded") on the left."""
    first = next(iter(sets.values()))[0][0]
    side, text = display_side(first.height), font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = int(max(probe.textlength(f"{name}  decoded", font=text) for name in sets)) + SECTION_GAP
    columns = max(len(originals) for originals, _ in sets.values())
    width = 2 * MARGIN + label_width + columns * (side + GAP)
    height = 2 * MARGIN + len(sets) * (2 * (side + GAP) + SECTION_GAP)
    canvas = Image.new("RGB", (width, height), PAPER)
    draw = ImageDraw.Draw(canvas)
    y = MARGIN
    for name, pair in sets.items():
        for label, images in zip((f"{name}  original", "decoded"), pair, strict=True):
            draw.text((MARGIN, y + side // 2 - text.size // 2), label, fill=INK, font=text)
            for i, image in enumerate(images):
                canvas.paste(image.resize((side, side), Image.NEAREST), (MARGIN + label_width + i * (side + GAP), y))
            y += side + GAP
        y += SECTION_GAP
    return canvas
