"""Bringing any PIL-readable image to an RGB square at the model resolution, and back."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

# An image as the stack accepts it: PIL, an image file, or a zero-argument callable making one (a lazy
# image: data.sentences.derived). The one image type of tokenizer/, data/, lvm/ and vlm/.
ImageLike = Image.Image | str | os.PathLike | Callable[[], Image.Image]

_HIGH_DEPTH_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: grayscale and palette expanded, alpha composited on white,
    16-bit and float images rescaled (a plain `convert("RGB")` would clip them to white)."""
    if image.mode in _HIGH_DEPTH_MODES:
        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        image = Image.fromarray(
            np.clip(values / _peak(image.mode, values) * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L"
        )
    if image.mode in ("La", "RGBa"):  # premultiplied alpha: PIL only un-premultiplies within its own family
        image = image.convert("LA" if image.mode == "La" else "RGBA")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def _peak(mode: str, values: np.ndarray) -> float:
    """The value that maps to white. "I;16*" modes are 16-bit by definition (a dark 16-bit image stays
    dark); "I" and "F" carry no bit depth, so it is read off the data: [0, 1] floats, 8-bit or 16-bit."""
    if mode.startswith("I;16"):
        return 65535.0
    high = float(values.max()) if values.size else 0.0
    if mode == "F" and high <= 1.0:
        return 1.0
    if high <= 255:
        return 255.0
    return 65535.0 if high <= 65535 else high


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image as RGB, upright as its EXIF orientation says (as photo viewers show
    it). Raises OSError (PIL's; PIL.UnidentifiedImageError for non-images) for unreadable or
    truncated files."""
    with Image.open(path) as image:
        image.load()
        return to_rgb(ImageOps.exif_transpose(image))


def resolve_image(image: ImageLike, what: str = "image") -> Image.Image:
    """ImageLike -> PIL: images pass through, files are loaded as RGB (`load_image`), callables are called.
    An unreadable file raises ValueError naming it as `what`."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, os.PathLike)):
        try:
            return load_image(image)
        except (OSError, SyntaxError) as error:  # PIL raises SyntaxError for some corrupt headers
            raise ValueError(f"{what} {os.fspath(image)!r} is not a readable image: {error}") from error
    if callable(image):
        return image()
    raise TypeError(f"{what} must be a PIL image, a path or a callable; got {type(image).__name__}")


def fit_to_resolution(image: Image.Image, size: int) -> Image.Image:
    """Resize the short side to `size` (bicubic; antialiased when shrinking), then center-crop a square."""
    image = to_rgb(image)
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((new_w, new_h), Image.BICUBIC, reducing_gap=None if scale >= 1 else 3.0)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_tensor(images: Image.Image | Sequence[Image.Image], size: int | None = None) -> torch.Tensor:
    """PIL image(s) -> float [B, 3, size, size] in [0, 1]; fitted to `size` when given."""
    if isinstance(images, Image.Image):
        images = [images]
    arrays = [
        np.asarray(fit_to_resolution(im, size) if size else to_rgb(im), dtype=np.uint8) for im in images
    ]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """float [B, 3, H, W] in [0, 1] -> list of PIL RGB images."""
    arrays = images.detach().clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arrays]


def psnr(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """float [B] PSNR in dB of images in [0, 1] against references (capped at 100 dB for exact matches)."""
    mse = (images.float() - references.float()).pow(2).flatten(1).mean(1)
    return -10 * torch.log10(mse.clamp_min(1e-10))


@torch.no_grad()
def reconstruction_psnr(vq, images: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Mean PSNR (dB) of `images` [B, 3, H, W] in [0, 1] after a VQGAN's encode -> decode, and the reconstructions."""
    recon = vq.decode(vq.encode(images))
    return float(psnr(recon, images).mean()), recon
