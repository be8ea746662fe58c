"""Image Area Preservation (IAP) tiling: the grid choice and the tiles tensor, in one place."""
from __future__ import annotations

import threading
import warnings
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


# The resize each upstream pipeline uses, so tiles and frames carry the pixels the model was
# trained on. "pillow": Pillow's Image.resize(BICUBIC) (the Eagle2 worker: dynamic_preprocess
# and its torchvision transform on PIL images). "torch": torch's antialiased bicubic on uint8
# CHW tensors (the Eagle2.5 processor: torchvision's F.resize on CPU, bit-identical). The two
# are not interchangeable: they differ by up to 8 levels on documents and 22 on noise.
KERNELS = ("pillow", "torch")


def split_tiles(image, *, max_tiles: int, min_tiles: int = 1, tile_size: int = 448,
                use_thumbnail: bool = True, kernel: str = "pillow") -> np.ndarray:
    """RGB image (Pillow's, libvips' from preprocess.fastdecode, or a uint8 (h, w, 3) array)
    -> uint8 array (n, tile_size, tile_size, 3): grid tiles row-major, thumbnail last,
    resized by `kernel` (one of KERNELS) exactly as that upstream pipeline resizes."""
    if isinstance(image, Image.Image) and image.mode != "RGB":
        raise ValueError(f"tiling needs an RGB image, got mode {image.mode!r}")
    w, h = _size(image)
    cols, rows = choose_grid(w, h, min_tiles=min_tiles, max_tiles=max_tiles,
                             tile_size=tile_size)
    n = cols * rows
    thumb = use_thumbnail and n > 1
    out = np.empty((n + thumb, tile_size, tile_size, 3), np.uint8)
    image = _for_kernel(image, kernel)
    targets = [(cols * tile_size, rows * tile_size)] + [(tile_size, tile_size)] * thumb
    if kernel == "pillow" and thumb:  # Pillow releases the GIL: grid and thumbnail side by side
        grid, small = _side_by_side(lambda: resize(image, *targets[0], kernel),
                                    lambda: resize(image, *targets[1], kernel))
    else:
        grid, *rest = [resize(image, *t, kernel) for t in targets]
        small = rest[0] if rest else None
    # torch's copy, not numpy's: it moves the grid 1.7x faster
    cut_grid(_tensor(grid), torch.from_numpy(out), cols, rows)
    if thumb:
        out[n] = small
    return out


def cut_grid(grid: torch.Tensor, out: torch.Tensor, cols: int, rows: int) -> None:
    """grid (rows*s, cols*s, 3) -> out[:cols*rows] (n, s, s, 3), tiles row-major."""
    s = out.shape[1]
    # (rows*s, cols*s, 3) -> (rows, s, cols, s, 3) -> (rows, cols, s, s, 3) = (n, s, s, 3)
    out[:cols * rows].view(rows, cols, s, s, 3).copy_(
        grid.view(rows, s, cols, s, 3).permute(0, 2, 1, 3, 4))


def resize(image, width: int, height: int, kernel: str = "pillow") -> np.ndarray:
    """(height, width, 3) uint8 from an RGB image (Pillow's, libvips', or a uint8 (h, w, 3)
    array), resized by `kernel` (one of KERNELS)."""
    image = _for_kernel(image, kernel)
    if kernel == "pillow":
        return np.asarray(image.resize((width, height), Image.Resampling.BICUBIC))
    x = _tensor(image).permute(2, 0, 1)  # a channels-last view: torch's fast uint8 path
    return resize_chw(x, width, height).permute(1, 2, 0).numpy()


def resize_frames(frames: list[np.ndarray], size: int, kernel: str) -> list[np.ndarray]:
    """Video frames, each uint8 (h, w, 3) of one size, -> (size, size, 3) each, as the style's
    pipeline resizes a frame (one tile, no thumbnail); torch's kernel takes them as a batch."""
    if kernel == "pillow" or len(frames) == 1:
        return [resize(f, size, size, kernel) for f in frames]
    x = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)  # (k, 3, h, w), channels last
    return list(resize_chw(x, size, size).permute(0, 2, 3, 1).numpy())


def resize_chw(x: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """(3, H, W) or (k, 3, H, W), uint8 or float in whole levels (CUDA has no uint8 kernel)
    -> the same layout at (height, width), same dtype: torch's antialiased bicubic, which on
    uint8 is torchvision's F.resize bit for bit. Float input takes the uint8 kernel's two
    passes (width, then height), each rounded and clamped to a level as uint8 storage does:
    within 2 levels of it, where one float pass overshoots by up to 10."""
    y = x if x.dim() == 4 else x[None]
    interp = torch.nn.functional.interpolate
    if y.dtype == torch.uint8:
        y = interp(y, size=(height, width), mode="bicubic", antialias=True)
    else:
        if width != y.shape[3]:
            y = interp(y, size=(y.shape[2], width), mode="bicubic", antialias=True)
            y = y.round_().clamp_(0, 255)
        if height != y.shape[2]:
            y = interp(y, size=(height, width), mode="bicubic", antialias=True)
            y = y.round_().clamp_(0, 255)
    return y if x.dim() == 4 else y[0]


def _tensor(arr: np.ndarray) -> torch.Tensor:
    """A read-only array (Pillow's pixels) as a tensor without a copy: the resize only reads."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


def _size(image) -> tuple[int, int]:
    if isinstance(image, np.ndarray):
        return image.shape[1], image.shape[0]
    return fastdecode.size(image) if fastdecode.is_vips(image) else image.size


def _for_kernel(image, kernel: str):
    """The image in the form `kernel` reads: Pillow's image, or a uint8 (h, w, 3) array."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if fastdecode.is_vips(image):
        image = image.numpy()
    if kernel == "pillow":
        return Image.fromarray(image) if isinstance(image, np.ndarray) else image
    return np.ascontiguousarray(image)


def _side_by_side(first, second):
    """first() here and second() on a thread of its own (no pool left behind), both results."""
    out: list = []
    worker = threading.Thread(target=lambda: out.append(_outcome(second)), name="resize")
    worker.start()
    a = first()
    worker.join()
    ok, b = out[0]
    if not ok:
        raise b
    return a, b


def _outcome(fn) -> tuple[bool, object]:
    try:
        return True, fn()
    except Exception as exc:  # re-raised in the caller's thread
        return False, exc


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
               norm: str = "siglip", kernel: str = "pillow") -> torch.Tensor:
    """RGB image -> float32 (n, 3, tile_size, tile_size): IAP tiles, thumbnail last, normalised."""
    return normalize(split_tiles(image, max_tiles=max_tiles, min_tiles=min_tiles,
                                 tile_size=tile_size, use_thumbnail=use_thumbnail,
                                 kernel=kernel), norm)
