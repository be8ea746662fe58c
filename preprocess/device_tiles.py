"""JPEG to IAP tiles on the model's device: decoded by nvJPEG (torchvision's decode_jpeg on
CUDA), oriented, resized (torch's antialiased bicubic: the Eagle2.5 processor's kernel, so
only for that style) and cut into tiles there, so a photo's pixels never exist on the CPU. The same steps run on a CPU device with libjpeg-turbo, which
is how the tests cover them without a GPU.

Only baseline RGB and greyscale JPEGs come here; CMYK/YCCK JPEGs, other formats and any
failure take the CPU path (preprocess.tiler), which also owns every error message.
"""
from __future__ import annotations

import contextlib
import threading
import warnings

import torch

from preprocess.tiler import choose_grid, cut_grid, resize_chw

# Pillow modes a JPEG opens in that nvJPEG turns into RGB as Pillow would
DECODABLE_MODES = ("RGB", "L")
_local = threading.local()
# torchvision 0.29 marks its image codecs deprecated in favour of TorchCodec, which has no
# nvJPEG decode yet; the warning would be printed by every media thread
warnings.filterwarnings("ignore", category=DeprecationWarning,
                        message="The image decoding and encoding capabilities of TorchVision")


def usable(fmt: str, mode: str) -> bool:
    """Whether an opened image can take this path."""
    return fmt == "JPEG" and mode in DECODABLE_MODES


def orient(x: torch.Tensor, orientation: int) -> torch.Tensor:
    """(3, H, W) -> the image upright for EXIF orientation 1-8 (Pillow's exif_transpose)."""
    if orientation == 2:
        return x.flip(2)
    if orientation == 3:
        return x.flip(1, 2)
    if orientation == 4:
        return x.flip(1)
    if orientation == 5:
        return x.transpose(1, 2)
    if orientation == 6:
        return x.rot90(-1, (1, 2))
    if orientation == 7:
        return x.transpose(1, 2).flip(1, 2)
    if orientation == 8:
        return x.rot90(1, (1, 2))
    return x


def jpeg_tiles(data: bytes, orientation: int, *, device: torch.device, max_tiles: int,
               min_tiles: int = 1, tile_size: int = 448,
               use_thumbnail: bool = True) -> torch.Tensor:
    """Encoded JPEG -> uint8 (n, tile_size, tile_size, 3) on `device`: grid tiles row-major,
    thumbnail last, the layout tiler.split_tiles gives. Raises whatever the decoder raises;
    the caller falls back to the CPU path."""
    from torchvision.io import ImageReadMode, decode_jpeg

    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    with _side_stream(device):
        image = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
        image = orient(image, orientation)
        if device.type != "cpu":  # no uint8 kernel there: the float passes (tiler.resize_chw)
            image = image.float()
        _, h, w = image.shape
        cols, rows = choose_grid(w, h, min_tiles=min_tiles, max_tiles=max_tiles,
                                 tile_size=tile_size)
        n = cols * rows
        thumb = use_thumbnail and n > 1
        out = torch.empty((n + thumb, tile_size, tile_size, 3), dtype=torch.uint8, device=device)
        cut_grid(resize_chw(image, cols * tile_size, rows * tile_size).permute(1, 2, 0), out,
                 cols, rows)
        if thumb:
            out[n] = resize_chw(image, tile_size, tile_size).permute(1, 2, 0)
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()  # ready for the engine's stream
    return out


def _side_stream(device: torch.device):
    """On CUDA, a stream of this media thread's own, so decoding overlaps the model's steps."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    streams = _local.__dict__.setdefault("streams", {})
    if device not in streams:
        streams[device] = torch.cuda.Stream(device)
    return torch.cuda.stream(streams[device])
