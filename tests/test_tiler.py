"""IAP tiler: the grid equals the upstream rule everywhere; tiles come out in the right order."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from preprocess import tiler


def upstream_grid(width: int, height: int, min_num: int, max_num: int, size: int = 448):
    """The upstream worker's find_closest_aspect_ratio + dynamic_preprocess grid choice, restated."""
    ratios = set()
    for n in range(min_num, max_num + 1):
        for i in range(1, n + 1):
            for j in range(1, n + 1):
                if min_num <= i * j <= max_num:
                    ratios.add((i, j))
    ordered = sorted(ratios, key=lambda r: r[0] * r[1])
    aspect = width / height
    best, best_factor = (1, 1), float("-inf")
    for r in ordered:
        target = r[0] / r[1]
        factor = min((r[0] * r[1] * size * size) / (width * height), 0.6) * min(
            target / aspect, aspect / target)
        if factor > best_factor:
            best, best_factor = r, factor
    return best


SIZES = sorted({(1, 1), (2, 1), (1, 2), (448, 448), (896, 448), (448, 896), (500, 500),
                (1000, 1000), (4032, 3024), (3024, 4032), (1275, 1650), (1080, 19200),
                (19200, 1080), (20000, 300), (300, 20000), (1920, 1080), (1080, 1920),
                (640, 480), (800, 600), (2000, 100), (100, 2000), (1344, 896), (1792, 1344),
                (3000, 3000), (10000, 10), (10, 10000), (7, 13), (1366, 768), (2480, 3508)}
               | {(w, h) for w in range(100, 5000, 730) for h in range(100, 5000, 610)})


@pytest.mark.parametrize("cap", range(1, 41))
def test_grid_equals_upstream_for_every_size_and_cap(cap: int) -> None:
    mismatches = [(w, h) for w, h in SIZES
                  if tiler.choose_grid(w, h, max_tiles=cap) != upstream_grid(w, h, 1, cap)]
    assert mismatches == []


def test_grid_with_a_minimum_and_ties_go_to_the_fewest_tiles() -> None:
    for w, h in SIZES[::3]:
        assert tiler.choose_grid(w, h, min_tiles=4, max_tiles=12) == upstream_grid(w, h, 4, 12)
    # a square image scores (1,1), (2,2), (3,3) ... by area: 448x448 saturates at (1,1) already
    assert tiler.choose_grid(448, 448) == (1, 1)
    assert tiler.choose_grid(1000, 1000) == (2, 2)


def test_bad_limits_raise_value_error_naming_them() -> None:
    with pytest.raises(ValueError, match="min_tiles=3, max_tiles=2"):
        tiler.choose_grid(100, 100, min_tiles=3, max_tiles=2)
    with pytest.raises(ValueError, match="0x5"):
        tiler.choose_grid(0, 5)


def _labelled_image(cols: int, rows: int, size: int = 448) -> Image.Image:
    """An image already at grid size whose tile k is filled with grey level 10*(k+1)."""
    arr = np.zeros((rows * size, cols * size, 3), np.uint8)
    for r in range(rows):
        for c in range(cols):
            arr[r * size:(r + 1) * size, c * size:(c + 1) * size] = 10 * (r * cols + c + 1)
    return Image.fromarray(arr)


def test_tiles_are_row_major_with_the_thumbnail_last() -> None:
    im = _labelled_image(3, 2)
    assert tiler.choose_grid(*im.size, max_tiles=6) == (3, 2)
    tiles = tiler.split_tiles(im, max_tiles=6)
    assert tiles.shape == (7, 448, 448, 3)
    centres = [int(t[224, 224, 0]) for t in tiles[:6]]
    assert centres == [10, 20, 30, 40, 50, 60]
    # the thumbnail shows the whole image: its top-left sixth is tile 0, bottom-right tile 5
    thumb = tiles[6]
    assert int(thumb[30, 30, 0]) == 10 and int(thumb[400, 400, 0]) == 60


def test_single_tile_has_no_thumbnail_and_values_are_normalised() -> None:
    im = Image.new("RGB", (300, 300), (255, 0, 128))
    x = tiler.tile_image(im, max_tiles=12)
    assert x.shape == (1, 3, 448, 448) and x.dtype == torch.float32
    assert torch.allclose(x[0, :, 100, 100], torch.tensor([1.0, -1.0, 128 / 127.5 - 1]), atol=1e-6)
    y = tiler.tile_image(im, max_tiles=12, norm="imagenet")
    assert y[0, 0, 5, 5].item() == pytest.approx((1.0 - 0.485) / 0.229, abs=1e-5)


def test_tile_counts_match_tile_image() -> None:
    for (w, h), cap in [((4032, 3024), 12), ((1080, 19200), 12), ((640, 480), 6), ((50, 50), 1)]:
        n = tiler.count_tiles(w, h, max_tiles=cap)
        assert tiler.split_tiles(Image.new("RGB", (w, h)), max_tiles=cap).shape[0] == n


def _noise(w: int, h: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


RESIZES = [((640, 360), (448, 448)), ((300, 200), (896, 448)), ((1000, 560), (896, 448)),
         ((2000, 300), (1344, 448)), ((37, 1900), (448, 448))]


@pytest.mark.parametrize("src, dst", RESIZES)
def test_each_kernel_is_its_upstream_resize_bit_for_bit(src, dst) -> None:
    from torchvision.transforms.v2 import functional as F

    arr = _noise(*src)
    pillow = np.asarray(Image.fromarray(arr).resize(dst, Image.Resampling.BICUBIC))
    assert np.array_equal(tiler.resize(arr, *dst, kernel="pillow"), pillow)
    tv = F.resize(torch.from_numpy(arr).permute(2, 0, 1).contiguous(), [dst[1], dst[0]],
                  interpolation=F.InterpolationMode.BICUBIC, antialias=True)
    assert np.array_equal(tiler.resize(arr, *dst, kernel="torch"), tv.permute(1, 2, 0).numpy())


def test_the_two_kernels_are_not_interchangeable() -> None:
    arr = _noise(608, 926)  # 11 levels apart here (1-2 on most photos and documents)
    a, b = (tiler.resize(arr, 448, 448, kernel=k) for k in tiler.KERNELS)
    assert np.abs(a.astype(int) - b).max() > 5


def test_the_float_passes_stay_within_two_levels_of_the_uint8_kernel() -> None:
    for (w, h), (tw, th) in RESIZES:
        x = torch.from_numpy(_noise(w, h)).permute(2, 0, 1)
        exact = tiler.resize_chw(x, tw, th)
        two_pass = tiler.resize_chw(x.float(), tw, th)
        assert two_pass.dtype == torch.float32
        assert (two_pass - exact.float()).abs().max() <= 2
    one_pass = torch.nn.functional.interpolate(x[None].float(), size=(th, tw), mode="bicubic",
                                               antialias=True)[0].round().clamp(0, 255)
    assert (one_pass - exact.float()).abs().max() > 2  # why the passes are split


def test_frames_resize_as_a_batch_like_one_by_one() -> None:
    frames = [_noise(640, 360, seed) for seed in range(3)]
    for kernel in tiler.KERNELS:
        batch = tiler.resize_frames(frames, 448, kernel)
        assert all(np.array_equal(b, tiler.resize(f, 448, 448, kernel))
                   for b, f in zip(batch, frames))


def test_an_unknown_kernel_is_refused() -> None:
    with pytest.raises(ValueError, match=r"kernel must be one of \('pillow', 'torch'\), got 'vips'"):
        tiler.split_tiles(Image.new("RGB", (500, 500)), max_tiles=4, kernel="vips")
