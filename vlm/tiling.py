"""Dynamic high resolution: one image -> several fixed-size RGB tiles for the vision encoder.

Three anchors, each reproduced with its own choices (tie rules, resampling filter, tile order):
  InternVL  (OpenGVLab/InternVL dynamic_preprocess): the min..max-tile grid whose aspect ratio is closest
            to the image's; the image is stretched onto it; tiles row-major, a thumbnail LAST when >1 tile.
  LLaVA-NeXT (anyres): the candidate resolution keeping the most pixels (then wasting the fewest); the
            image is resized into it keeping its aspect ratio and padded black; the base image FIRST.
  POINTS    (WePOINTS CATTY): the grid whose aspect ratio is closest on the image's own side, the image
            resized keeping its aspect ratio, overlapping sliding windows, a thumbnail last (always).
Sizes are (width, height) and grids (cols, rows) throughout, as PIL writes them.
"""

import math

import numpy as np
from PIL import Image

# LLaVA-NeXT (v1.6)'s image_grid_pinpoints, (width, height).
LLAVA_NEXT_RESOLUTIONS = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> RGB, or an error saying what was received.
    Transparent modes are composited onto white (as transformers' convert_rgb); 16-bit modes (I;16*)
    are scaled by 255/65535; 32-bit I and F images outside 0..255 are stretched min..max to 0..255."""
    if not isinstance(image, Image.Image):
        shape = f" of shape {tuple(image.shape)}" if hasattr(image, "shape") else ""
        raise TypeError(
            f"expected a PIL.Image.Image, got {type(image).__name__}{shape}; "
            "wrap arrays with PIL.Image.fromarray (uint8, HxWx3)"
        )
    width, height = image.size
    if width < 1 or height < 1:
        raise ValueError(f"image has size {width}x{height} (mode {image.mode}); tiling needs at least 1x1 pixels")
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16"):
            values = values * (255 / 65535)
        elif values.min() < 0 or values.max() > 255:
            values = (values - values.min()) / max(values.max() - values.min(), 1e-12) * 255
        return Image.fromarray(np.rint(values).astype(np.uint8), mode="L").convert("RGB")
    try:
        if image.has_transparency_data:
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
        return image.convert("RGB")
    except ValueError as err:
        raise ValueError(f"cannot convert a PIL image of mode {image.mode!r} to RGB ({err}); "
                         "convert it to RGB, L or RGBA first") from err


def _check_size(width: int, height: int, tile_size: int) -> None:
    if width < 1 or height < 1 or tile_size < 1:
        raise ValueError(f"need width, height, tile_size >= 1; got {width}x{height}, tile_size={tile_size}")


# ---- InternVL ----


def internvl_grid(width: int, height: int, tile_size: int = 448, min_tiles: int = 1,
                  max_tiles: int = 12) -> tuple[int, int]:
    """(cols, rows) as InternVL's find_closest_aspect_ratio picks it: among grids with min..max tiles, in
    order of tile count, the one whose cols/rows is closest to width/height; on an equal difference a later
    (larger) grid replaces the current one only when width*height > 0.5 * tile^2 * cols*rows."""
    _check_size(width, height, tile_size)
    if not 1 <= min_tiles <= max_tiles:
        raise ValueError(f"need 1 <= min_tiles <= max_tiles; got min_tiles={min_tiles}, max_tiles={max_tiles}")
    # Built as a set and stably sorted by tile count, exactly as InternVL does: among grids of the same
    # count the set's iteration order decides exact ties, so the same construction gives the same order.
    grids = {(c, r) for n in range(min_tiles, max_tiles + 1) for c in range(1, n + 1) for r in range(1, n + 1)
             if min_tiles <= c * r <= max_tiles}
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in sorted(grids, key=lambda g: g[0] * g[1]):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def internvl_tiles(image: Image.Image, tile_size: int = 448, min_tiles: int = 1, max_tiles: int = 12,
                   thumbnail: bool = True) -> list[Image.Image]:
    """The image stretched to (cols*tile, rows*tile) (bicubic, PIL's default there), cut into cols*rows
    tiles row-major; then, when there is more than one tile and `thumbnail`, the whole image at tile size."""
    image = to_rgb(image)
    cols, rows = internvl_grid(*image.size, tile_size, min_tiles, max_tiles)
    resized = image.resize((cols * tile_size, rows * tile_size), Image.BICUBIC)
    tiles = [resized.crop((c * tile_size, r * tile_size, (c + 1) * tile_size, (r + 1) * tile_size))
             for r in range(rows) for c in range(cols)]
    if thumbnail and len(tiles) > 1:
        tiles.append(image.resize((tile_size, tile_size), Image.BICUBIC))
    return tiles


# ---- LLaVA-NeXT anyres ----


def select_best_resolution(original_size: tuple[int, int],
                           possible_resolutions: list[tuple[int, int]]) -> tuple[int, int]:
    """The (width, height) among possible_resolutions that keeps the most of the image's pixels once it is
    scaled to fit inside (capped at its own pixel count), then wastes the fewest; the first wins a full
    tie. LLaVA-NeXT's rule (transformers' select_best_resolution is the same with (height, width))."""
    width, height = original_size
    _check_size(width, height, 1)
    if not possible_resolutions:
        raise ValueError("possible_resolutions is empty; pass (width, height) pairs, e.g. LLAVA_NEXT_RESOLUTIONS")
    best, best_key = None, None
    for cand_w, cand_h in possible_resolutions:
        scale = min(cand_w / width, cand_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        key = (effective, -(cand_w * cand_h - effective))  # more kept pixels, then less waste
        if best_key is None or key > best_key:
            best, best_key = (cand_w, cand_h), key
    return best


def anyres_tiles(image: Image.Image, possible_resolutions: list[tuple[int, int]] = LLAVA_NEXT_RESOLUTIONS,
                 tile_size: int = 336) -> list[Image.Image]:
    """LLaVA-NeXT's process_anyres_image: the base image (the whole image stretched to tile x tile) FIRST,
    then the image resized into the best resolution keeping its aspect ratio, centred on black, cut into
    tiles row-major. Resampling is bicubic (PIL's default there)."""
    image = to_rgb(image)
    width, height = image.size
    target_w, target_h = select_best_resolution(image.size, possible_resolutions)
    if target_w % tile_size or target_h % tile_size:
        raise ValueError(f"resolution {target_w}x{target_h} is not a multiple of tile_size={tile_size}")
    # Fill the side that limits the scale exactly; the other rounds up, capped at the target.
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        new_w, new_h = target_w, min(math.ceil(height * scale_w), target_h)
    else:
        new_w, new_h = min(math.ceil(width * scale_h), target_w), target_h
    canvas = Image.new("RGB", (target_w, target_h), (0, 0, 0))
    canvas.paste(image.resize((new_w, new_h), Image.BICUBIC), ((target_w - new_w) // 2, (target_h - new_h) // 2))
    tiles = [canvas.crop((x, y, x + tile_size, y + tile_size))
             for y in range(0, target_h, tile_size) for x in range(0, target_w, tile_size)]
    return [image.resize((tile_size, tile_size), Image.BICUBIC), *tiles]


# ---- POINTS CATTY ----


def _catty_fit(width: int, height: int, max_tiles: int) -> tuple[int, int] | None:
    """The size CATTY tiles: the image itself when its aspect ratio is within 1/max..max; with too extreme
    a ratio the long side is squeezed to max_tiles times the short one (POINTS' do_resize)."""
    if 1 / max_tiles <= width / height <= max_tiles:
        return width, height
    return (max_tiles * height, height) if width > height else (width, max_tiles * width)


def catty_grid(width: int, height: int, tile_size: int = 448, max_tiles: int = 8) -> tuple[int, int] | None:
    """(cols, rows) as WePOINTS' find_best_slices picks it, or None when width/height lies outside
    1/max_tiles..max_tiles (POINTS returns None there unless told to resize; `catty_tiles` resizes).
    Candidates are the factor pairs (c, n/c) of n = 1..max_tiles. Only ratios c/r on the image's side of
    1 are allowed (c/r <= w/h for a tall image, >= for a wide one, so the grid's long side is never
    shorter than the image's); the closest ratio wins, then, among its grids, the one whose tile count is
    closest to (w/tile)*(h/tile), the smallest on a tie."""
    _check_size(width, height, tile_size)
    if max_tiles < 1:
        raise ValueError(f"max_tiles must be >= 1, got {max_tiles}")
    aspect = width / height
    if aspect > max_tiles or aspect < 1 / max_tiles:
        return None
    by_ratio: dict[float, list[tuple[int, int]]] = {}  # ratio -> grids, by tile count (dict order decides ties)
    for n in range(1, max_tiles + 1):
        for cols in range(1, n + 1):
            if n % cols == 0:
                by_ratio.setdefault(cols / (n // cols), []).append((cols, n // cols))
    if aspect < 1:
        allowed = [r for r in by_ratio if r <= aspect]
    elif aspect > 1:
        allowed = [r for r in by_ratio if r >= aspect]
    else:
        allowed = list(by_ratio)
    ratio = min(allowed, key=lambda r: abs(r - aspect))
    wanted = (width / tile_size) * (height / tile_size)
    return min(by_ratio[ratio], key=lambda g: abs(g[0] * g[1] - wanted))


def catty_layout(width: int, height: int, tile_size: int = 448,
                 max_tiles: int = 8) -> tuple[tuple[int, int], list[tuple[int, int, int, int]]]:
    """Where CATTY cuts: the resized (width, height) and the window boxes (x0, y0, x1, y1), row-major.
    The image is resized so its short side spans the grid exactly, keeping its aspect ratio (the long side
    is int(), so at most the grid's length); windows of tile x tile then slide along the long side with
    stride (length - tile) // (count - 1), overlapping where the image is shorter than the grid."""
    width, height = _catty_fit(width, height, max_tiles)
    cols, rows = catty_grid(width, height, tile_size, max_tiles)
    if width / tile_size < height / tile_size:  # WePOINTS compares the slice counts, not the sides
        new_w = cols * tile_size
        new_h = int(height / width * new_w)
    else:
        new_h = rows * tile_size
        new_w = int(width / height * new_h)
    stride_x = (new_w - tile_size) // (cols - 1) if cols > 1 else 0
    stride_y = (new_h - tile_size) // (rows - 1) if rows > 1 else 0
    xs = range(0, new_w - tile_size + 1, stride_x or tile_size)
    ys = range(0, new_h - tile_size + 1, stride_y or tile_size)
    return (new_w, new_h), [(x, y, x + tile_size, y + tile_size) for y in ys for x in xs]


def catty_tiles(image: Image.Image, tile_size: int = 448, max_tiles: int = 8,
                thumbnail: bool = True) -> list[Image.Image]:
    """WePOINTS' split_image_with_catty (with do_resize): the image resized (bilinear, as POINTS) to
    catty_layout's size, the windows row-major, then the resized image at tile x tile LAST (POINTS adds the
    thumbnail even for a single tile)."""
    image = to_rgb(image)
    fitted = _catty_fit(*image.size, max_tiles)
    if fitted != image.size:
        image = image.resize(fitted, Image.BILINEAR)
    size, boxes = catty_layout(*image.size, tile_size, max_tiles)
    resized = image.resize(size, Image.BILINEAR)
    tiles = [resized.crop(box) for box in boxes]
    if thumbnail:
        tiles.append(resized.resize((tile_size, tile_size), Image.BILINEAR))
    return tiles
