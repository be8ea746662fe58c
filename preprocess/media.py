"""Image decoding under a policy: allow-listed formats, size caps before decode, RGB out."""
from __future__ import annotations

import io
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from preprocess import fastdecode
from preprocess.errors import MediaError

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
_FORMAT_NAMES = {"JPEG": "JPEG", "PNG": "PNG", "WEBP": "WebP", "GIF": "GIF", "BMP": "BMP"}
# EXIF orientations 5-8 swap width and height.
_SWAPS_AXES = {5, 6, 7, 8}


@dataclass(frozen=True)
class ImagePolicy:
    """Limits applied to every image before it is decoded."""

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 64_000_000
    max_side: int = 20_000
    formats: tuple[str, ...] = ALLOWED_FORMATS


@dataclass
class OpenedImage:
    """A validated image header: format and oriented size known, pixels not yet decoded."""

    image: Image.Image
    format: str
    label: str
    orientation: int
    key: str = ""  # set by callers that cache by content
    data: bytes = b""  # the encoded bytes, for decoders other than Pillow

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) after EXIF orientation."""
        w, h = self.image.size
        return (h, w) if self.orientation in _SWAPS_AXES else (w, h)

    def load(self):
        """Decode to 8-bit RGB at full size (upstream's pipelines resize the whole decoded
        image, so nothing is dropped in the decoder): a Pillow image, or a libvips one for
        PNG (preprocess.fastdecode, the same pixels faster; the tiler takes either,
        `decode_image` gives Pillow's)."""
        if (self.format in fastdecode.FORMATS and fastdecode.available() and self.data
                and self.orientation == 1):
            return fastdecode.decode(self.data, self.format, self.label)
        im = self.image
        try:
            im.load()
            im = ImageOps.exif_transpose(im) if self.orientation > 1 else im
            return to_rgb(im)
        except MediaError:
            raise
        except Exception as exc:  # Pillow raises OSError, ValueError, struct.error, ...
            raise MediaError(f"{self.label}: the {_FORMAT_NAMES[self.format]} data is damaged or "
                             f"truncated ({_short(exc)})") from None


def open_image(data: bytes, policy: ImagePolicy = ImagePolicy(), label: str = "image") -> OpenedImage:
    """Check the header of an encoded image against `policy` without decoding its pixels.

    Raises MediaError naming `label`, the problem and the limit.
    """
    if not data:
        raise MediaError(f"{label}: the image is empty (0 bytes)")
    if len(data) > policy.max_bytes:
        raise MediaError(f"{label}: the image is {len(data):,} bytes, over the "
                         f"{policy.max_bytes:,}-byte limit")
    try:
        im = Image.open(io.BytesIO(data), formats=list(policy.formats))
    except Image.DecompressionBombError as exc:
        # Pillow's own guard (left at its default) fires before ours on the largest bombs.
        found = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
        raise MediaError(f"{label}: {_magic_format(data) or 'the image'} is {pixels}, over the "
                         f"{policy.max_pixels / 1e6:g}-megapixel limit") from None
    except UnidentifiedImageError:
        known = _magic_format(data)
        if known:
            raise MediaError(f"{label}: the {known} data is damaged or truncated") from None
        raise MediaError(f"{label}: not a supported image; send JPEG, PNG, WebP, GIF or BMP "
                         f"({_sniff(data)})") from None
    except Exception as exc:  # a damaged header can raise anything Pillow's parsers raise
        raise MediaError(f"{label}: the image header is damaged ({_short(exc)})") from None
    fmt = im.format or "?"
    name = _FORMAT_NAMES.get(fmt, fmt)
    w, h = im.size
    if w < 1 or h < 1:
        raise MediaError(f"{label}: {name} declares an empty size {w}x{h}")
    if w * h > policy.max_pixels:
        raise MediaError(f"{label}: {name} is {w}x{h}, over the "
                         f"{policy.max_pixels / 1e6:g}-megapixel limit")
    if max(w, h) > policy.max_side:
        raise MediaError(f"{label}: {name} is {w}x{h}, over the {policy.max_side}-pixel side limit")
    try:
        orientation = _orientation(im, fmt)
    except Exception:  # a damaged EXIF block is ignored, as browsers do
        orientation = 1
    # An animation stays on its first frame: never ask is_animated or n_frames, which walk
    # the file (a GIF may hold thousands of frames, or a damaged second one).
    return OpenedImage(im, fmt, label, orientation if 1 <= orientation <= 8 else 1, data=data)


def _orientation(im: Image.Image, fmt: str) -> int:
    """EXIF orientation from the header. For PNG only an eXIf chunk before the image data
    counts (where the PNG specification puts it): Pillow's getexif() on a PNG decodes the
    whole image to look for a later one, which cost a 20-megapixel screenshot 170 ms."""
    if fmt == "PNG":
        raw = im.info.get("exif")
        if not raw:
            return 1
        exif = Image.Exif()
        exif.load(raw)
        return int(exif.get(0x0112, 1))
    if fmt in ("JPEG", "WEBP"):
        return int(im.getexif().get(0x0112, 1))
    return 1


def decode_image(data: bytes, policy: ImagePolicy = ImagePolicy(),
                 label: str = "image") -> Image.Image:
    """Decode encoded bytes to an 8-bit RGB PIL image with EXIF orientation applied."""
    image = open_image(data, policy, label).load()
    return fastdecode.to_pil(image) if fastdecode.is_vips(image) else image


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: alpha composited onto white, 16-bit scaled, CMYK converted."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.uint32 if mode == "I" else np.uint16)
        scale = 257 if mode != "I" or arr.max(initial=0) > 255 else 1
        im = Image.fromarray((np.clip(arr, 0, 65535) // scale).astype(np.uint8), "L")
        mode = "L"
    if mode == "F":
        im = Image.fromarray(np.clip(np.asarray(im), 0, 255).astype(np.uint8), "L")
        mode = "L"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def _magic_format(data: bytes) -> str:
    """The allowed format these bytes start like, or ''."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data.startswith(b"BM"):
        return "BMP"
    return ""


def _sniff(data: bytes) -> str:
    """A short hint of what the bytes look like, for the error message."""
    heads = {b"%!PS": "looks like PostScript/EPS", b"8BPS": "looks like PSD",
             b"II*\x00": "looks like TIFF", b"MM\x00*": "looks like TIFF",
             b"%PDF": "looks like PDF", b"SIMPLE": "looks like FITS"}
    for magic, what in heads.items():
        if data.startswith(magic):
            return what
    return f"first bytes {data[:8].hex()}"


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."
