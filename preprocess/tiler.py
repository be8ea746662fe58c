"""Image Area Preservation (IAP) tiling: the grid choice and the tiles tensor, in one place."""
from __future__ import annotations

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
    """RGB image -> uint8 array (n, tile_size, tile_size, 3): grid tiles row-major, thumbnail last.

    The image is resized once to the grid (bicubic); the thumbnail is taken from that
    resized image rather than the original, which costs a fraction of a second less on
    large photos and differs from it by well under a grey level on average.
    """
    if image.mode != "RGB":
        raise ValueError(f"split_tiles needs an RGB image, got mode {image.mode!r}")
    cols, rows = choose_grid(*image.size, min_tiles=min_tiles, max_tiles=max_tiles,
                             tile_size=tile_size)
    grid = image.resize((cols * tile_size, rows * tile_size), Image.Resampling.BICUBIC)
    # (rows*s, cols*s, 3) -> (rows, s, cols, s, 3) -> (rows, cols, s, s, 3) -> (n, s, s, 3)
    arr = np.asarray(grid).reshape(rows, tile_size, cols, tile_size, 3)
    tiles = arr.transpose(0, 2, 1, 3, 4).reshape(rows * cols, tile_size, tile_size, 3)
    if use_thumbnail and rows * cols > 1:
        thumb = np.asarray(grid.resize((tile_size, tile_size), Image.Resampling.BICUBIC))
        tiles = np.concatenate([tiles, thumb[None]], axis=0)
    return tiles


def normalize(tiles: np.ndarray, norm: str = "siglip") -> torch.Tensor:
    """uint8 (n, s, s, 3) -> float32 (n, 3, s, s), scaled to [0, 1] then normalised by mean/std."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {sorted(NORMS)}, got {norm!r}")
    if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != np.uint8:
        raise ValueError(f"tiles must be uint8 (n, s, s, 3), got {tiles.dtype} {tiles.shape}")
    mean, std = NORMS[norm]
    scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(1, 3, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(mean, std)]).view(1, 3, 1, 1)
    x = torch.from_numpy(np.require(tiles, requirements=["C", "W"])).permute(0, 3, 1, 2).float()
    return x.mul_(scale).sub_(shift).contiguous()


def tile_image(image: Image.Image, *, max_tiles: int = 12, min_tiles: int = 1,
               tile_size: int = 448, use_thumbnail: bool = True,
               norm: str = "siglip") -> torch.Tensor:
    """RGB image -> float32 (n, 3, tile_size, tile_size): IAP tiles, thumbnail last, normalised."""
    return normalize(split_tiles(image, max_tiles=max_tiles, min_tiles=min_tiles,
                                 tile_size=tile_size, use_thumbnail=use_thumbnail), norm)
