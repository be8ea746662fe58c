"""Image decoding under policy: a corpus of bad and awkward images, each with its outcome."""
from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import factory
import numpy as np
import pytest
from PIL import Image

from preprocess import fastdecode
from preprocess.errors import MediaError
from preprocess.media import ImagePolicy, decode_image, open_image, to_rgb


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height; its pixel data is a few zeros."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 4096)) + _png_chunk(b"IEND", b""))


def _jpeg(im: Image.Image, **kw) -> bytes:
    return factory.encode(im, "JPEG", quality=90, **kw)


def _exif_rotated() -> tuple[bytes, Image.Image]:
    """A 60x40 JPEG stored sideways with EXIF orientation 6, and what it should look like."""
    upright = factory.photo(40, 60, seed=5)
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # orientation 6 rotates it back
    exif = Image.Exif()
    exif[0x0112] = 6
    return _jpeg(stored, exif=exif.tobytes()), upright


def _gif_of_many_frames(n: int) -> bytes:
    frames = [Image.new("P", (8, 8), i % 255) for i in range(n)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=10)
    return buf.getvalue()


PHOTO = factory.photo(64, 48)
JPEG = _jpeg(PHOTO)
PNG = factory.encode(PHOTO, "PNG")

REJECTED = {
    "zero bytes": (b"", "the image is empty (0 bytes)"),
    "random bytes": (np.random.default_rng(0).bytes(3000), "not a supported image"),
    "truncated JPEG": (JPEG[: len(JPEG) // 2], "the JPEG data is damaged or truncated"),
    "truncated PNG": (PNG[: len(PNG) // 2], "the PNG data is damaged or truncated"),
    "PNG header only": (PNG[:40], "PNG data is damaged or truncated"),
    "PNG declaring 20000x20000": (png_declaring(20000, 20000),
                                  "PNG is 400,000,000 pixels, over the 64-megapixel limit"),
    "PNG declaring 10000x9000": (png_declaring(10000, 9000),
                                 "PNG is 10000x9000, over the 64-megapixel limit"),
    "PNG declaring 90000x10": (png_declaring(90000, 10), "over the 20000-pixel side limit"),
    "EPS": (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
            "looks like PostScript/EPS"),
    "PSD": (b"8BPS\x00\x01" + b"\x00" * 60, "looks like PSD"),
    "TIFF": (factory.encode(PHOTO, "TIFF"), "looks like TIFF"),
    "PDF": (b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\n", "looks like PDF"),
    "FITS": (b"SIMPLE  =                    T" + b" " * 50, "looks like FITS"),
    "ICO": (factory.encode(PHOTO, "ICO"), "not a supported image"),
    "over the byte cap": (b"\xff\xd8" + b"\x00" * (2 * 1024 * 1024),
                          "over the 1,048,576-byte limit"),
    # found by fuzz/fuzz_image.py: once raised IndexError from Pillow's is_animated
    "GIF cut in its second frame": (
        (Path(__file__).parent / "data" / "gif-cut-in-second-frame.gif").read_bytes(),
        "the GIF data is damaged or truncated"),
}

ACCEPTED = {
    "JPEG": (JPEG, (64, 48)),
    "PNG": (PNG, (64, 48)),
    "WebP": (factory.encode(PHOTO, "WEBP"), (64, 48)),
    "BMP": (factory.encode(PHOTO, "BMP"), (64, 48)),
    "grey JPEG": (_jpeg(PHOTO.convert("L")), (64, 48)),
    "CMYK JPEG": (_jpeg(PHOTO.convert("CMYK")), (64, 48)),
    "16-bit PNG": (factory.encode(Image.fromarray(np.full((20, 30), 40000, np.uint16)), "PNG"),
                   (30, 20)),
    "palette PNG with transparency": (
        factory.encode(Image.new("P", (16, 16), 0), "PNG", transparency=0), (16, 16)),
    "RGBA PNG": (factory.encode(Image.new("RGBA", (10, 10), (0, 0, 0, 0)), "PNG"), (10, 10)),
    "LA PNG": (factory.encode(Image.new("LA", (10, 10), (0, 0)), "PNG"), (10, 10)),
    "1-bit BMP": (factory.encode(Image.new("1", (9, 7), 1), "BMP"), (9, 7)),
    "GIF of 3000 frames": (_gif_of_many_frames(3000), (8, 8)),
    "1x20000 strip": (factory.encode(Image.new("RGB", (1, 20000), (9, 9, 9)), "PNG"), (1, 20000)),
}

POLICY = ImagePolicy(max_bytes=1024 * 1024)


@pytest.mark.parametrize("name", sorted(REJECTED))
def test_bad_images_raise_media_error_with_the_reason(name: str) -> None:
    data, reason = REJECTED[name]
    with pytest.raises(MediaError) as info:
        decode_image(data, POLICY, label="image 2")
    assert str(info.value).startswith("image 2: ")
    assert reason in str(info.value)


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_awkward_images_become_8_bit_rgb(name: str) -> None:
    data, size = ACCEPTED[name]
    im = decode_image(data, POLICY)
    assert im.mode == "RGB" and im.size == size
    assert np.asarray(im).dtype == np.uint8


def test_alpha_is_composited_onto_white_and_16_bit_is_scaled() -> None:
    clear = decode_image(ACCEPTED["RGBA PNG"][0])
    assert np.asarray(clear)[5, 5].tolist() == [255, 255, 255]
    palette = decode_image(ACCEPTED["palette PNG with transparency"][0])
    assert np.asarray(palette)[0, 0].tolist() == [255, 255, 255]
    deep = decode_image(ACCEPTED["16-bit PNG"][0])
    assert np.asarray(deep)[0, 0].tolist() == [40000 // 257] * 3


def test_exif_orientation_is_applied() -> None:
    data, upright = _exif_rotated()
    im = decode_image(data)
    assert im.size == (40, 60)
    assert open_image(data).size == (40, 60)
    diff = np.abs(np.asarray(im, np.int16) - np.asarray(upright, np.int16)).mean()
    assert diff < 6, diff


def test_cmyk_colours_survive() -> None:
    im = decode_image(_jpeg(Image.new("RGB", (16, 16), (200, 30, 30)).convert("CMYK")))
    r, g, b = np.asarray(im)[8, 8].tolist()
    assert r > 150 and g < 90 and b < 90


def test_bombs_and_huge_gifs_cost_milliseconds() -> None:
    for data in (REJECTED["PNG declaring 20000x20000"][0], ACCEPTED["GIF of 3000 frames"][0]):
        start = time.perf_counter()
        try:
            decode_image(data, POLICY)
        except MediaError:
            pass
        assert time.perf_counter() - start < 0.1


def test_a_jpeg_is_decoded_at_full_size_as_upstream_decodes_it() -> None:
    # no DCT-domain downscale (Pillow's draft): upstream resizes the fully decoded photo
    data = _jpeg(factory.photo(2000, 1500))
    ours = decode_image(data)
    assert ours.size == (2000, 1500)
    assert np.array_equal(np.asarray(ours), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def test_decoders_carry_their_security_fixes() -> None:
    from PIL import features

    def version(name: str) -> tuple[int, ...]:
        return tuple(int(p) for p in features.version(name).split(".")[:3])

    assert version("webp") >= (1, 3, 2)  # CVE-2023-4863 (libwebp heap overflow)
    import PIL

    assert tuple(int(p) for p in PIL.__version__.split(".")[:2]) >= (11, 3)


@pytest.mark.skipif(not fastdecode.available(), reason="pyvips (the server extra) not installed")
@pytest.mark.parametrize("name", ["PNG", "16-bit PNG", "palette PNG with transparency",
                                  "RGBA PNG", "LA PNG", "1x20000 strip"])
def test_png_decodes_through_libvips_to_pillows_pixels(name: str) -> None:
    """The decoder chosen per format: PNG by libvips, with exactly the pixels Pillow's path
    (to_rgb) gives, alpha on white and 16-bit scaled alike."""
    data, size = ACCEPTED[name]
    opened = open_image(data, POLICY)
    image = opened.load()
    assert fastdecode.is_vips(image) and fastdecode.size(image) == size
    pillow = np.asarray(to_rgb(Image.open(io.BytesIO(data))))
    assert np.array_equal(np.asarray(fastdecode.to_pil(image)), pillow)


@pytest.mark.skipif(not fastdecode.available(), reason="pyvips (the server extra) not installed")
@pytest.mark.parametrize("data", [PNG[: len(PNG) // 2], PNG[:60] + bytes(200) + PNG[260:]],
                         ids=["truncated", "zeroed IDAT"])
def test_damaged_pngs_fail_in_libvips_with_media_error(data: bytes) -> None:
    opened = open_image(data, POLICY, label="image 3")  # the header is intact
    with pytest.raises(MediaError, match="^image 3: the PNG data is damaged or truncated"):
        opened.load()


def test_a_truncated_webp_is_refused_at_its_header() -> None:
    """Pillow reads a WebP's whole RIFF body when it opens it, so a cut one never reaches
    libvips."""
    with pytest.raises(MediaError, match="^image 3: the image header is damaged"):
        open_image(factory.encode(PHOTO, "WEBP")[:-40], POLICY, label="image 3")


def test_jpeg_webp_bmp_and_gif_stay_on_pillow() -> None:
    for data in (JPEG, ACCEPTED["WebP"][0], ACCEPTED["BMP"][0],
                 ACCEPTED["GIF of 3000 frames"][0]):
        image = open_image(data, POLICY).load()
        assert isinstance(image, Image.Image) and image.mode == "RGB"
