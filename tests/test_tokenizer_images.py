"""tokenizer.images: any PIL image -> an RGB square at the model resolution -> tensors, and back."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, UnidentifiedImageError

from tokenizer import fit_to_resolution, load_image, to_pil, to_rgb, to_tensor
from tokenizer.images import psnr, resolve_image


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


# -- to_rgb ------------------------------------------------------------------------------------------
def test_grayscale_is_expanded():
    image = to_rgb(Image.fromarray(np.array([[0, 77, 255]], dtype=np.uint8), mode="L"))
    assert image.mode == "RGB"
    assert pixels(image).tolist() == [[[0, 0, 0], [77, 77, 77], [255, 255, 255]]]


def test_rgba_is_composited_on_white():
    rgba = np.array([[[200, 10, 10, 0], [200, 10, 10, 255], [0, 0, 0, 128]]], dtype=np.uint8)
    image = to_rgb(Image.fromarray(rgba, mode="RGBA"))
    assert image.mode == "RGB"
    out = pixels(image).astype(int)
    assert out[0, 0].tolist() == [255, 255, 255]  # fully transparent -> white, not the hidden red
    assert out[0, 1].tolist() == [200, 10, 10]  # opaque -> unchanged
    assert np.abs(out[0, 2] - 127).max() <= 1  # half-transparent black over white -> mid gray


def test_la_is_composited_on_white():
    image = to_rgb(Image.fromarray(np.array([[[0, 0], [50, 255]]], dtype=np.uint8), mode="LA"))
    assert pixels(image).tolist() == [[[255, 255, 255], [50, 50, 50]]]


def test_premultiplied_alpha_modes():
    la = Image.fromarray(np.array([[[0, 0], [50, 255]]], dtype=np.uint8), mode="LA").convert("La")
    assert la.mode == "La"
    assert pixels(to_rgb(la)).tolist() == [[[255, 255, 255], [50, 50, 50]]]
    rgba = Image.fromarray(np.array([[[9, 9, 9, 0], [10, 20, 30, 255]]], dtype=np.uint8), mode="RGBA")
    assert pixels(to_rgb(rgba.convert("RGBa"))).tolist() == [[[255, 255, 255], [10, 20, 30]]]


def test_palette_colours_and_transparency():
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    assert pixels(to_rgb(image)).tolist() == [[[255, 0, 0], [0, 0, 255]]]
    image.info["transparency"] = 0  # palette index 0 transparent, as in GIFs
    assert pixels(to_rgb(image)).tolist() == [[[255, 255, 255], [0, 0, 255]]]


def test_sixteen_bit_is_rescaled_not_clipped():
    values = np.array([[0, 32768, 65535, 257]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    out = pixels(to_rgb(image))[0, :, 0].astype(int)
    assert out[0] == 0 and out[2] == 255 and out[3] == 1
    assert abs(out[1] - 128) <= 1


def test_dark_sixteen_bit_image_stays_dark():
    """An I;16 image is 16-bit whatever its content: values up to 200 are near black, not up to 200/255."""
    image = Image.fromarray(np.array([[0, 100, 200]], dtype=np.uint16))
    assert image.mode == "I;16"
    assert pixels(to_rgb(image))[0, :, 0].tolist() == [0, 0, 1]


def test_sixteen_bit_png_file(tmp_path):
    Image.fromarray(np.array([[0, 65535], [32768, 16384]], dtype=np.uint16)).save(tmp_path / "depth.png")
    out = pixels(load_image(tmp_path / "depth.png"))[..., 0].astype(int)
    assert out[0].tolist() == [0, 255]
    assert abs(out[1, 0] - 128) <= 1 and abs(out[1, 1] - 64) <= 1


def test_int32_image_with_8_bit_values():
    image = Image.fromarray(np.array([[0, 100, 255]], dtype=np.int32))
    assert image.mode == "I"
    assert pixels(to_rgb(image))[0, :, 0].tolist() == [0, 100, 255]


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([0.0, 0.5, 1.0], [0, 128, 255]),  # [0, 1] floats
        ([0.0, 127.5, 255.0], [0, 128, 255]),  # 0..255 floats
        ([0.0, 32768.0, 65535.0], [0, 128, 255]),  # 16-bit levels as floats
        ([-1.0, 0.25, 2.0], [0, 0, 2]),  # above 1: 8-bit levels; negatives clip to 0
    ],
)
def test_float_images(values, expected):
    image = Image.fromarray(np.array([values], dtype=np.float32))
    assert image.mode == "F"
    assert pixels(to_rgb(image))[0, :, 0].tolist() == expected


def test_rgb_passes_through_unchanged():
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert np.array_equal(pixels(to_rgb(Image.fromarray(rgb))), rgb)


# -- fit_to_resolution ---------------------------------------------------------------------------------
@pytest.mark.parametrize("size_in", [(300, 100), (100, 300), (20, 12), (64, 64), (7, 500)])
def test_fit_to_resolution_gives_a_square(size_in):
    image = Image.new("RGB", size_in, (10, 200, 30))
    out = fit_to_resolution(image, 64)
    assert out.size == (64, 64) and out.mode == "RGB"
    assert np.abs(pixels(out).astype(int) - [10, 200, 30]).max() <= 1


def test_fit_to_resolution_crops_the_center_of_a_landscape_image():
    # 300x100: left third red, middle third green, right third blue -> the square is the green middle
    array = np.zeros((100, 300, 3), dtype=np.uint8)
    array[:, :100, 0] = 255
    array[:, 100:200, 1] = 255
    array[:, 200:, 2] = 255
    out = pixels(fit_to_resolution(Image.fromarray(array), 50)).astype(int)
    assert out.shape == (50, 50, 3)
    inner = out[:, 3:-3]  # away from the resampling seam at the crop edges
    assert (inner[..., 1] >= 250).all() and (inner[..., 0] <= 5).all() and (inner[..., 2] <= 5).all()


def test_fit_to_resolution_crops_the_center_of_a_portrait_image():
    array = np.zeros((90, 30, 3), dtype=np.uint8)
    array[:30] = 255  # white top, black middle, white bottom
    array[60:] = 255
    out = pixels(fit_to_resolution(Image.fromarray(array), 30))
    assert out.shape == (30, 30, 3)
    assert out.max() == 0


def test_fit_to_resolution_upscales_small_images():
    array = np.zeros((4, 8, 3), dtype=np.uint8)
    array[:, 4:] = 255  # left half black, right half white; the crop is the middle 4x4 of the 8x4
    out = pixels(fit_to_resolution(Image.fromarray(array), 32)).astype(int)
    assert out.shape == (32, 32, 3)
    assert out[:, :8].max() < 30 and out[:, -8:].min() > 225


def test_fit_to_resolution_converts_modes():
    out = fit_to_resolution(Image.new("RGBA", (40, 20), (0, 0, 0, 0)), 16)
    assert out.mode == "RGB" and pixels(out).min() == 255


# -- tensors ----------------------------------------------------------------------------------------
def test_to_tensor_and_to_pil_round_trip_exactly():
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(3)]
    tensor = to_tensor([Image.fromarray(a) for a in arrays])
    assert tensor.shape == (3, 3, 16, 16) and tensor.dtype == torch.float32
    assert 0 <= float(tensor.min()) and float(tensor.max()) <= 1
    assert torch.equal(tensor[1, 2], torch.from_numpy(arrays[1][..., 2]).float() / 255)
    back = to_pil(tensor)
    assert len(back) == 3
    for image, array in zip(back, arrays, strict=True):
        assert image.mode == "RGB" and np.array_equal(pixels(image), array)


def test_to_tensor_single_image_with_size():
    tensor = to_tensor(Image.new("L", (40, 20), 51), size=8)
    assert tensor.shape == (1, 3, 8, 8)
    assert torch.allclose(tensor, torch.full_like(tensor, 0.2))


def test_to_pil_clamps_and_rounds():
    tensor = torch.tensor([-0.5, 0.5, 1.5, 0.999]).view(1, 1, 1, 4).expand(1, 3, 1, 4)
    assert pixels(to_pil(tensor)[0])[0, :, 0].tolist() == [0, 128, 255, 255]


# -- load_image --------------------------------------------------------------------------------------
def _jpeg_bytes(size=(64, 48)) -> bytes:
    buffer = io.BytesIO()
    array = np.random.default_rng(2).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def test_load_image_reads_rgb(tmp_path):
    Image.new("L", (10, 6), 200).save(tmp_path / "gray.png")
    image = load_image(tmp_path / "gray.png")
    assert image.mode == "RGB" and image.size == (10, 6)
    assert pixels(image).min() == 200 == pixels(image).max()


def test_load_image_truncated_jpeg_raises_oserror(tmp_path):
    data = _jpeg_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match="truncated"):
        load_image(tmp_path / "cut.jpg")


def test_load_image_not_an_image(tmp_path):
    (tmp_path / "notes.jpg").write_text("these are words, not pixels")
    with pytest.raises(UnidentifiedImageError):
        load_image(tmp_path / "notes.jpg")


def test_load_image_applies_exif_orientation(tmp_path):
    """A phone photo stored sideways with EXIF orientation 6 loads upright, as viewers show it."""
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, :20] = 255  # left half white as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(array).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    image = load_image(tmp_path / "phone.jpg")
    assert image.size == (20, 40)
    out = pixels(image).astype(int)
    assert out[:15].mean() > 240 and out[-15:].mean() < 15  # stored left -> displayed top


def test_psnr_matches_its_definition():
    """Catches a PSNR on the wrong scale (255 vs 1), averaged over the batch, or infinite on exact matches."""
    images = torch.zeros(2, 3, 4, 4)
    references = torch.stack([torch.full((3, 4, 4), 0.1), torch.zeros(3, 4, 4)])
    assert torch.allclose(psnr(images, references), torch.tensor([20.0, 100.0]))  # mse 0.01 -> 20 dB


def test_resolve_image_takes_every_image_like(tmp_path):
    """Catches a path, PIL image or lazy callable being refused, or a bad file reported without its name."""
    image = Image.new("RGB", (4, 4), (255, 0, 0))
    image.save(tmp_path / "red.png")
    (tmp_path / "notes.png").write_text("not an image")
    for like in (image, tmp_path / "red.png", str(tmp_path / "red.png"), lambda: image):
        assert resolve_image(like).getpixel((0, 0)) == (255, 0, 0)
    with pytest.raises(ValueError, match="query '.*notes.png' is not a readable image"):
        resolve_image(tmp_path / "notes.png", "query")
    with pytest.raises(TypeError, match="PIL image, a path or a callable"):
        resolve_image(3)
