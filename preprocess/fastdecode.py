"""libvips (pyvips) for PNG, which it decodes fastest on this project's machines with Pillow's
exact pixels (through libspng, 2-4x Pillow's zlib path on the bench's documents and
screenshots). Measured in `make bench` (the decoder table). JPEG stays with Pillow: libvips'
decode is the same libjpeg-turbo, within noise of it (0-20% across runs), and its worker
threads grow with concurrent decodes. WebP too: the two bundle different libwebp builds (up to
2 levels apart) and Pillow's is faster. Resizing is not done here: libvips' kernels differ
from upstream's by up to 18 levels (preprocess.tiler).

Only bytes that Pillow's header check already accepted come here (format, size and pixel
limits are enforced before any decoding), and each format goes to its own loader, never to
libvips' format sniffing. Without pyvips everything stays on Pillow.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from preprocess.errors import MediaError

FORMATS = ("PNG",)
_NAMES = {"PNG": "PNG"}
_LOADERS = {"PNG": "pngload_buffer"}

try:  # an optional speed-up: the server extra brings it, a bare install does without
    import pyvips

    pyvips.cache_set_max(0)  # each image is decoded once; the operation cache only holds memory
except (ImportError, OSError):  # the module, or its libvips, is missing
    pyvips = None


def available() -> bool:
    return pyvips is not None


def is_vips(image: Any) -> bool:
    return pyvips is not None and isinstance(image, pyvips.Image)


def decode(data: bytes, fmt: str, label: str) -> Any:
    """Encoded PNG -> an 8-bit sRGB vips image in memory, alpha composited onto white and
    16-bit scaled as Pillow's path does (to_rgb), the same pixels as Pillow's. Raises
    MediaError when damaged."""
    loader = getattr(pyvips.Image, _LOADERS[fmt])
    try:
        image = loader(data, fail_on="warning")
        if image.interpretation in ("grey16", "rgb16") or image.format == "ushort":
            image = (image / 257).cast("uchar")  # 0..65535 -> 0..255, as x // 257
        if image.hasalpha():
            image = image.flatten(background=[255] * (image.bands - 1))
        if image.bands == 1:
            image = image.bandjoin([image, image])
        elif image.bands != 3:
            raise MediaError(f"{label}: the {_NAMES[fmt]} has {image.bands} colour bands")
        return image.cast("uchar").copy_memory()
    except MediaError:
        raise
    except pyvips.Error as exc:
        why = str(exc).strip().splitlines()
        raise MediaError(f"{label}: the {_NAMES[fmt]} data is damaged or truncated "
                         f"({why[-1][:120] if why else 'libvips'})") from None


def size(image: Any) -> tuple[int, int]:
    return image.width, image.height


def to_pil(image: Any) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(image.numpy()), "RGB")


__all__ = ["FORMATS", "available", "decode", "is_vips", "size", "to_pil"]
