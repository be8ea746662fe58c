"""Image Area Preservation (IAP) tiling: the grid choice and the tiles tensor, in one place."""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from PIL import Image

from preprocess import fastdecode

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMS = {"siglip": (SIGLIP_MEAN, SIGLIP_STD), "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}
# Once the tiles cover this share of the original area, more area earns nothing.
_AREA_SATURATION = 0.6


@lru_cache(maxsize=256)
def candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """All (cols, rows) with min_tiles <= cols*rows <= max_tiles, fewest tiles first.

    Among grids with the same tile count the order is that of Python's set iteration of
    the (cols, rows) tuples, as the upstream worker builds it; the order decides ties.
    """
    if min_tiles < 1 or max_tiles < min_tiles:
        raise ValueError(f"tile limits must satisfy 1 <= min_tiles <= max_tiles, "
                         f"got min_tiles={min_tiles}, max_tiles={max_tiles}")
    grids = {(c, r) for n in range(min_tiles, max_tiles + 1)
             for c in range(1, n + 1) for r in range(1, n + 1)
             if min_tiles <= c * r <= max_tiles}
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def choose_grid(width: int, height: int, *, min_tiles: int = 1, max_tiles: int = 12,
                tile_size: int = 448) -> tuple[int, int]:
    """The IAP grid (cols, rows) for an image of `width` x `height` pixels.

    Score of a grid: min(tiled area / image area, 0.6) * (aspect-ratio similarity in (0, 1]).
    The first grid (fewest tiles) with the highest score wins.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    aspect = width / height
    area = width * height
    best, best_score = (1, 1), float("-inf")
    for cols, rows in candidate_grids(min_tiles, max_tiles):
        grid_aspect = cols / rows
        score = (min((cols * rows * tile_size * tile_size) / area, _AREA_SATURATION)
                 * min(grid_aspect / aspect, aspect / grid_aspect))
        if score > best_score:
            best, best_score = (cols, rows), score
    return best


def count_tiles(width: int, height: int, *, max_tiles: int, min_tiles: int = 1,
                use_thumbnail: bool = True, tile_size: int = 448) -> int:
    """Tiles `tile_image` yields for this size and cap: the grid, plus a thumbnail if > 1."""
    cols, rows = choose_grid(width, height, min_tiles=min_tiles, max_tiles=max_tiles,
                             tile_size=tile_size)
    n = cols * rows
    return n + 1 if use_thumbnail and n > 1 else n


def split_tiles(image, *, max_tiles: int, min_tiles: int = 1,
                tile_size: int = 448, use_thumbnail: bool = True) -> np.ndarray:
    """RGB image (Pillow's, or libvips' from preprocess.fastdecode) -> uint8 array
    (n, tile_size, tile_size, 3): grid tiles row-major, thumbnail last.

    Resampling is bicubic with antialiasing, as Pillow's resize (the upstream pipeline's):
    libvips when it shrinks both axes (the photo's grid and thumbnail in 6 ms against
    Pillow's 48 ms on two threads, within rounding of Pillow's pixels), torch's uint8
    kernel otherwise (made to match Pillow: 81 dB on the document's upscale, 2.6x faster).
    """
    if not fastdecode.is_vips(image) and image.mode != "RGB":
        raise ValueError(f"tiling needs an RGB image, got mode {image.mode!r}")
    w, h = fastdecode.size(image) if fastdecode.is_vips(image) else image.size
    cols, rows = choose_grid(w, h, min_tiles=min_tiles, max_tiles=max_tiles,
                             tile_size=tile_size)
    n = cols * rows
    out = np.empty((n + (1 if use_thumbnail and n > 1 else 0), tile_size, tile_size, 3),
                   np.uint8)
    # torch's copy, not numpy's: the upscale's grid is channel-planar underneath, and torch
    # moves it 1.7x faster (4.6 against 8.0 ms for the document's 12 tiles)
    cut_grid(torch.from_numpy(_resize(image, cols * tile_size, rows * tile_size)),
             torch.from_numpy(out), cols, rows)
    if len(out) > n:
        out[n] = _resize(image, tile_size, tile_size)
    return out


def cut_grid(grid: torch.Tensor, out: torch.Tensor, cols: int, rows: int) -> None:
    """grid (rows*s, cols*s, 3) -> out[:cols*rows] (n, s, s, 3), tiles row-major."""
    s = out.shape[1]
    # (rows*s, cols*s, 3) -> (rows, s, cols, s, 3) -> (rows, cols, s, s, 3) = (n, s, s, 3)
    out[:cols * rows].view(rows, cols, s, s, 3).copy_(
        grid.view(rows, s, cols, s, 3).permute(0, 2, 1, 3, 4))


def _resize(image, width: int, height: int) -> np.ndarray:
    """(height, width, 3) uint8, bicubic with antialiasing."""
    w, h = fastdecode.size(image) if fastdecode.is_vips(image) else image.size
    if fastdecode.available() and width <= w and height <= h:
        if not fastdecode.is_vips(image):
            image = fastdecode.from_pil(image)
        return fastdecode.resize(image, width, height)
    arr = image.numpy() if fastdecode.is_vips(image) else np.asarray(image)
    x = torch.from_numpy(np.require(arr, requirements=["C", "W"])).permute(2, 0, 1)
    return resize_chw(x, width, height).permute(1, 2, 0).numpy()


def resize_chw(x: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """(3, H, W) uint8, or float in [0, 255] (CUDA has no uint8 kernel) -> (3, height,
    width) of the same dtype in whole levels: bicubic with antialiasing, after a box
    reduction to twice the target when shrinking more than 4x (Pillow's reducing_gap)."""
    y = x[None]
    if width * 4 < x.shape[2] or height * 4 < x.shape[1]:
        pooled = torch.nn.functional.adaptive_avg_pool2d(
            y.float(), (max(height * 2, 1), max(width * 2, 1))).round_()
        y = pooled.to(x.dtype)
    y = torch.nn.functional.interpolate(y, size=(height, width), mode="bicubic",
                                        antialias=True)[0]
    return y if y.dtype == torch.uint8 else y.round_().clamp_(0, 255)


def normalize(tiles: np.ndarray | torch.Tensor, norm: str = "siglip") -> torch.Tensor:
    """uint8 (n, s, s, 3) -> float32 (n, 3, s, s), scaled to [0, 1] then normalised by
    mean/std; a tensor's tiles (preprocess.device_tiles) are normalised on their device."""
    if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype not in (np.uint8, torch.uint8):
        raise ValueError(f"tiles must be uint8 (n, s, s, 3), got {tiles.dtype} {tuple(tiles.shape)}")
    device = tiles.device if isinstance(tiles, torch.Tensor) else None
    out = torch.empty((tiles.shape[0], 3, tiles.shape[1], tiles.shape[2]), dtype=torch.float32,
                      device=device)
    if device is not None and device.type == "cuda":  # made on a media thread's stream
        tiles.record_stream(torch.cuda.current_stream(device))
    _normalize_into(out, tiles, _norm(norm))
    return out


def _norm(norm: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {sorted(NORMS)}, got {norm!r}")
    return NORMS[norm]


def _normalize_into(out: torch.Tensor, tiles: np.ndarray,
                    stats: tuple[tuple[float, ...], tuple[float, ...]]) -> None:
    """out (k, 3, s, s) float32 <- tiles (k, s, s, 3) uint8, normalised in place."""
    mean, std = stats
    src = tiles if isinstance(tiles, torch.Tensor) else \
        torch.from_numpy(np.require(tiles, requirements=["C", "W"]))
    out.copy_(src.permute(0, 3, 1, 2))
    if len(set(mean)) == 1 and len(set(std)) == 1:  # one affine map for all channels
        out.mul_(1.0 / (255.0 * std[0])).sub_(mean[0] / std[0])
        return
    out.mul_(torch.tensor([1.0 / (255.0 * v) for v in std], device=out.device).view(1, 3, 1, 1))
    out.sub_(torch.tensor([m / v for m, v in zip(mean, std)], device=out.device).view(1, 3, 1, 1))


def tile_image(image: Image.Image, *, max_tiles: int = 12, min_tiles: int = 1,
               tile_size: int = 448, use_thumbnail: bool = True,
               norm: str = "siglip") -> torch.Tensor:
    """RGB image -> float32 (n, 3, tile_size, tile_size): IAP tiles, thumbnail last, normalised."""
    return normalize(split_tiles(image, max_tiles=max_tiles, min_tiles=min_tiles,
                                 tile_size=tile_size, use_thumbnail=use_thumbnail), norm)
