"""vlm.tiling against references written here from the anchors' own code (OpenGVLab/InternVL
dynamic_preprocess, LLaVA-NeXT mm_utils, WePOINTS catty.py), plus coverage, tile order and bad input."""

import math

import numpy as np
import pytest
from PIL import Image

from vlm import tiling

# ---- references, statement for statement as the anchors write them ----


def ref_internvl_grid(width, height, image_size, min_num, max_num):
    aspect_ratio = width / height
    target_ratios = set(
        (i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
        if i * j <= max_num and i * j >= min_num
    )
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    best_ratio_diff, best_ratio, area = float("inf"), (1, 1), width * height
    for ratio in target_ratios:
        ratio_diff = abs(aspect_ratio - ratio[0] / ratio[1])
        if ratio_diff < best_ratio_diff:
            best_ratio_diff, best_ratio = ratio_diff, ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def ref_select_best_resolution(original_size, possible_resolutions):
    original_width, original_height = original_size
    best_fit, max_effective, min_wasted = None, 0, float("inf")
    for width, height in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        dw, dh = int(original_width * scale), int(original_height * scale)
        effective = min(dw * dh, original_width * original_height)
        wasted = width * height - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            max_effective, min_wasted, best_fit = effective, wasted, (width, height)
    return best_fit


def ref_catty_slices(width, height, image_size, max_splits):
    """WePOINTS split_image_with_catty up to the crop: (best_slices, resized size), or None."""
    ratio = width / height
    if ratio > max_splits or ratio < 1 / max_splits:
        return None
    mapping = {}
    for i in range(1, max_splits + 1):
        for factor in [[k, i // k] for k in range(1, i + 1) if i % k == 0]:
            mapping.setdefault(factor[0] / factor[1], []).append(factor)
    if ratio < 1:
        mapping = {k: v for k, v in mapping.items() if k <= ratio}
    elif ratio > 1:
        mapping = {k: v for k, v in mapping.items() if k >= ratio}
    width_slices, height_slices = width / image_size, height / image_size
    best_ratio = min(mapping.keys(), key=lambda x: abs(x - ratio))
    best = min(mapping[best_ratio], key=lambda x: abs(x[0] * x[1] - width_slices * height_slices))
    if width_slices < height_slices:
        new_w = best[0] * image_size
        new_h = int(height / width * new_w)
    else:
        new_h = best[1] * image_size
        new_w = int(width / height * new_h)
    return tuple(best), (new_w, new_h)


SIZES = [(1, 1), (2, 1), (448, 448), (500, 500), (800, 800), (1400, 1400), (1000, 500), (500, 1000),
         (1920, 1080), (1080, 1920), (640, 480), (3000, 200), (200, 3000), (10000, 10), (10, 10000),
         (1344, 896), (896, 1344), (4032, 3024), (333, 777), (1023, 1), (1, 1023), (2688, 448), (905, 448)]
LIMITS = [(1, 12), (1, 6), (2, 12), (4, 4), (1, 40), (3, 9)]


def test_internvl_grid_equals_reference_on_a_table():
    checked = 0
    for width, height in SIZES:
        for tile in (448, 224):
            for min_tiles, max_tiles in LIMITS:
                expected = ref_internvl_grid(width, height, tile, min_tiles, max_tiles)
                assert tiling.internvl_grid(width, height, tile, min_tiles, max_tiles) == expected, (
                    width, height, tile, min_tiles, max_tiles)
                checked += 1
    # and a dense sweep of sizes for the default limits
    for width in range(16, 4000, 97):
        for height in range(16, 4000, 89):
            assert tiling.internvl_grid(width, height) == ref_internvl_grid(width, height, 448, 1, 12)
    assert checked == len(SIZES) * 2 * len(LIMITS)


def test_internvl_tie_rule_prefers_a_larger_grid_only_for_a_large_image():
    # a square image ties (1,1), (2,2), (3,3): a larger grid wins only if area > 0.5 * 448^2 * tiles
    assert tiling.internvl_grid(500, 500) == (1, 1)  # 250000 <= 0.5 * 448^2 * 4
    assert tiling.internvl_grid(800, 800) == (2, 2)  # 640000 > 401408, but <= 903168 for (3,3)
    assert tiling.internvl_grid(1400, 1400) == (3, 3)
    assert tiling.internvl_grid(1000, 500) == (2, 1)


def _gradient(width, height):
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    rgb = np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
                          np.full((height, width, 1), 128.0)], axis=2)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def _reassemble(tiles, cols, rows, tile):
    canvas = Image.new("RGB", (cols * tile, rows * tile))
    for i, t in enumerate(tiles):
        canvas.paste(t, ((i % cols) * tile, (i // cols) * tile))
    return canvas


@pytest.mark.parametrize("size", [(300, 100), (100, 300), (64, 64), (20, 1)])
def test_internvl_tiles_cover_the_image_row_major_thumbnail_last(size):
    image, tile = _gradient(*size), 32
    cols, rows = tiling.internvl_grid(*size, tile, 1, 12)
    tiles = tiling.internvl_tiles(image, tile, 1, 12)
    grid = cols * rows
    assert len(tiles) == grid + (grid > 1)
    assert all(t.size == (tile, tile) and t.mode == "RGB" for t in tiles)
    resized = image.resize((cols * tile, rows * tile), Image.BICUBIC)
    assert np.array_equal(np.asarray(_reassemble(tiles[:grid], cols, rows, tile)), np.asarray(resized))
    if grid > 1:
        assert np.array_equal(np.asarray(tiles[-1]), np.asarray(image.resize((tile, tile), Image.BICUBIC)))


def test_select_best_resolution_equals_llava_next_and_transformers():
    from transformers.image_processing_utils import select_best_resolution as hf_select

    candidates = [tiling.LLAVA_NEXT_RESOLUTIONS, [(336 * i, 336 * j) for i in range(1, 4) for j in range(1, 4)],
                  [(384, 384), (768, 384), (384, 768), (1152, 384)]]
    for width, height in SIZES:
        for cands in candidates:
            got = tiling.select_best_resolution((width, height), cands)
            assert got == ref_select_best_resolution((width, height), cands)
            # transformers writes (height, width) for both
            assert got == hf_select((height, width), [(h, w) for w, h in cands])[::-1]


def test_anyres_tiles_base_first_then_the_padded_canvas():
    image, tile = _gradient(100, 30), 16
    resolutions = [(16, 32), (32, 16), (32, 32), (48, 16), (16, 48)]
    target = tiling.select_best_resolution(image.size, resolutions)
    assert target == (48, 16)
    tiles = tiling.anyres_tiles(image, resolutions, tile)
    assert len(tiles) == 1 + 3
    assert np.array_equal(np.asarray(tiles[0]), np.asarray(image.resize((tile, tile), Image.BICUBIC)))
    # LLaVA-NeXT: width fills (48), height ceil(30 * 0.48) = 15, pasted at y = 0, black below
    canvas = Image.new("RGB", target)
    canvas.paste(image.resize((48, math.ceil(30 * (48 / 100))), Image.BICUBIC), (0, 0))
    assert np.array_equal(np.asarray(_reassemble(tiles[1:], 3, 1, tile)), np.asarray(canvas))


def test_catty_grid_and_layout_equal_wepoints_on_a_table():
    for width, height in SIZES:
        for tile in (448, 336, 32):
            for max_tiles in (8, 12, 4, 1):
                ref = ref_catty_slices(width, height, tile, max_tiles)
                grid = tiling.catty_grid(width, height, tile, max_tiles)
                assert grid == (ref and ref[0]), (width, height, tile, max_tiles)
                if ref is not None:
                    assert tiling.catty_layout(width, height, tile, max_tiles)[0] == ref[1]


@pytest.mark.parametrize("size,max_tiles", [((1920, 1080), 8), ((1080, 1920), 8), ((3000, 200), 12),
                                            ((700, 448), 8), ((448, 448), 8), ((10000, 10), 8)])
def test_catty_windows_cover_the_resized_image_and_overlap(size, max_tiles):
    tile = 448
    (new_w, new_h), boxes = tiling.catty_layout(*size, tile, max_tiles)
    fitted = tiling._catty_fit(*size, max_tiles)
    cols, rows = tiling.catty_grid(*fitted, tile, max_tiles)
    assert len(boxes) == cols * rows
    assert new_w <= cols * tile and new_h <= rows * tile  # the grid's long side is never shorter
    assert boxes[0][:2] == (0, 0)
    # every pixel inside some window, except at most (count - 1) pixels the integer stride leaves at the end
    covered = np.zeros((new_h, new_w), bool)
    for x0, y0, x1, y1 in boxes:
        assert x1 - x0 == tile and y1 - y0 == tile and x1 <= new_w and y1 <= new_h
        covered[y0:y1, x0:x1] = True
    assert covered[: new_h - (rows - 1), : new_w - (cols - 1)].all()


def test_catty_tiles_thumbnail_last_even_for_one_tile():
    image = _gradient(60, 40)
    tiles = tiling.catty_tiles(image, tile_size=16, max_tiles=8)
    (w, h), boxes = tiling.catty_layout(60, 40, 16, 8)
    resized = image.resize((w, h), Image.BILINEAR)
    assert len(tiles) == len(boxes) + 1
    for tile, box in zip(tiles, boxes, strict=False):
        assert np.array_equal(np.asarray(tile), np.asarray(resized.crop(box)))
    assert np.array_equal(np.asarray(tiles[-1]), np.asarray(resized.resize((16, 16), Image.BILINEAR)))
    assert len(tiling.catty_tiles(_gradient(20, 20), tile_size=32)) == 2  # one window + thumbnail
    assert tiling.catty_grid(10000, 10) is None  # POINTS refuses without do_resize; catty_tiles squeezes
    assert len(tiling.catty_tiles(Image.new("RGB", (10000, 10)), tile_size=32, max_tiles=8)) == 8 + 1


@pytest.mark.parametrize("mode", ["1", "L", "P", "LA", "PA", "RGBA", "RGBa", "CMYK", "YCbCr", "LAB", "HSV",
                                  "I", "F", "I;16", "I;16B"])
@pytest.mark.parametrize("size", [(1, 1), (10000, 10), (7, 300)])
def test_every_mode_and_size_becomes_rgb_tiles(mode, size):
    image = Image.new(mode, size)
    for tiles in (tiling.internvl_tiles(image, 32, 1, 6), tiling.anyres_tiles(image, [(32, 64), (64, 32)], 32),
                  tiling.catty_tiles(image, 32, 8)):
        assert tiles and all(t.mode == "RGB" and t.size == (32, 32) for t in tiles)


def test_to_rgb_scales_deep_images_and_whitens_transparency():
    deep = Image.fromarray(np.array([[0, 65535], [32896, 257]], dtype=np.uint16))
    assert deep.mode == "I;16"
    assert np.asarray(tiling.to_rgb(deep))[..., 0].tolist() == [[0, 255], [128, 1]]
    wide = Image.fromarray(np.array([[-1000, 3000]], dtype=np.int32), "I")
    assert np.asarray(tiling.to_rgb(wide))[..., 0].tolist() == [[0, 255]]
    clear = Image.new("RGBA", (2, 2), (10, 20, 30, 0))
    assert np.asarray(tiling.to_rgb(clear)).tolist() == [[[255, 255, 255]] * 2] * 2


def test_bad_images_say_what_was_received():
    with pytest.raises(TypeError, match=r"got ndarray of shape \(4, 4, 3\)"):
        tiling.internvl_tiles(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="size 0x5"):
        tiling.to_rgb(Image.new("L", (0, 5)))
    with pytest.raises(ValueError, match="mode 'La'"):
        tiling.to_rgb(Image.new("La", (2, 2)))
    with pytest.raises(ValueError, match="min_tiles <= max_tiles"):
        tiling.internvl_grid(10, 10, min_tiles=5, max_tiles=2)
    with pytest.raises(ValueError, match="not a multiple of tile_size"):
        tiling.anyres_tiles(Image.new("RGB", (10, 10)), [(100, 50)], 32)
