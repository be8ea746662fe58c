"""Image Area Preservation (IAP) tiling: the grid choice and the tiles tensor, in one place."""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

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


def split_tiles(image: Image.Image, *, max_tiles: int, min_tiles: int = 1,
                tile_size: int = 448, use_thumbnail: bool = True) -> np.ndarray:
    """RGB image -> uint8 array (n, tile_size, tile_size, 3): grid tiles row-major, thumbnail last."""
    cols, rows, count = _plan(image, max_tiles, min_tiles, tile_size, use_thumbnail)
    out = np.empty((count, tile_size, tile_size, 3), np.uint8)
    _resample(image, cols, rows, tile_size, out)
    return out


def _plan(image: Image.Image, max_tiles: int, min_tiles: int, tile_size: int,
          use_thumbnail: bool) -> tuple[int, int, int]:
    if image.mode != "RGB":
        raise ValueError(f"tiling needs an RGB image, got mode {image.mode!r}")
    cols, rows = choose_grid(*image.size, min_tiles=min_tiles, max_tiles=max_tiles,
                             tile_size=tile_size)
    n = cols * rows
    return cols, rows, n + 1 if use_thumbnail and n > 1 else n


def _resample(image: Image.Image, cols: int, rows: int, tile_size: int,
              out: np.ndarray) -> None:
    """Resize `image` to the cols x rows grid into `out` (n, s, s, 3), the thumbnail last.

    The grid is resized (bicubic) in horizontal bands of whole tile rows, one band per
    worker thread (Pillow releases the GIL while it resamples); a band's filter reads the
    source rows around it, so the seams match a single resize to within a grey level or
    two. The thumbnail (when `out` has room for it) is resized from the same source, after
    a box reduction when it shrinks by more than 4x.
    """
    w, h = image.size
    scale = h / (rows * tile_size)

    def band(a: int, b: int) -> None:
        part = image.resize((cols * tile_size, (b - a) * tile_size), Image.Resampling.BICUBIC,
                            box=(0, a * tile_size * scale, w, b * tile_size * scale))
        # (k*s, cols*s, 3) -> (k, s, cols, s, 3) -> (k, cols, s, s, 3) -> (k*cols, s, s, 3)
        arr = np.asarray(part).reshape(b - a, tile_size, cols, tile_size, 3)
        out[a * cols:b * cols] = arr.transpose(0, 2, 1, 3, 4).reshape(-1, tile_size, tile_size, 3)

    def thumbnail() -> None:
        small = image.resize((tile_size, tile_size), Image.Resampling.BICUBIC, reducing_gap=2.0)
        out[cols * rows] = np.asarray(small)

    tasks = [lambda a=a, b=b: band(a, b) for a, b in _bands(rows, 2)]
    tasks += [thumbnail] if len(out) > cols * rows else []
    if len(tasks) == 1:
        tasks[0]()
    else:
        for future in [_pool().submit(task) for task in tasks]:
            future.result()


def _bands(rows: int, workers: int) -> list[tuple[int, int]]:
    """Split tile rows into up to `workers` contiguous bands."""
    k = min(rows, workers)
    edges = [round(i * rows / k) for i in range(k + 1)]
    return [(edges[i], edges[i + 1]) for i in range(k) if edges[i + 1] > edges[i]]


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """Threads shared by all tiling calls (created on first use)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max(3, min(6, 2 * (os.cpu_count() or 2))),
                                       thread_name_prefix="tiler")
        return _POOL


def normalize(tiles: np.ndarray, norm: str = "siglip") -> torch.Tensor:
    """uint8 (n, s, s, 3) -> float32 (n, 3, s, s), scaled to [0, 1] then normalised by mean/std."""
    if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != np.uint8:
        raise ValueError(f"tiles must be uint8 (n, s, s, 3), got {tiles.dtype} {tiles.shape}")
    out = torch.empty((tiles.shape[0], 3, tiles.shape[1], tiles.shape[2]), dtype=torch.float32)
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
    out.copy_(torch.from_numpy(np.require(tiles, requirements=["C", "W"])).permute(0, 3, 1, 2))
    if len(set(mean)) == 1 and len(set(std)) == 1:  # one affine map for all channels
        out.mul_(1.0 / (255.0 * std[0])).sub_(mean[0] / std[0])
        return
    out.mul_(torch.tensor([1.0 / (255.0 * v) for v in std]).view(1, 3, 1, 1))
    out.sub_(torch.tensor([m / v for m, v in zip(mean, std)]).view(1, 3, 1, 1))


def tile_image(image: Image.Image, *, max_tiles: int = 12, min_tiles: int = 1,
               tile_size: int = 448, use_thumbnail: bool = True,
               norm: str = "siglip") -> torch.Tensor:
    """RGB image -> float32 (n, 3, tile_size, tile_size): IAP tiles, thumbnail last, normalised."""
    return normalize(split_tiles(image, max_tiles=max_tiles, min_tiles=min_tiles,
                                 tile_size=tile_size, use_thumbnail=use_thumbnail), norm)
