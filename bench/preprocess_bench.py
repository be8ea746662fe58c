"""Preprocessing: each upstream pipeline (the Eagle2 worker's, the Eagle2.5 processor's),
restated step by step, against ours with the kernel that reproduces it."""
from __future__ import annotations

import io
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.common import best_of, table
from preprocess import frames, tiler
from preprocess.media import open_image
from tests import factory

MEAN = torch.tensor([0.5, 0.5, 0.5]).view(3, 1, 1)
STD = torch.tensor([0.5, 0.5, 0.5]).view(3, 1, 1)


def _upstream_transform(tile: Image.Image) -> torch.Tensor:
    """torchvision's Compose(RGB, Resize((448,448), BICUBIC), ToTensor, Normalize), restated."""
    tile = tile.convert("RGB") if tile.mode != "RGB" else tile
    tile = tile.resize((448, 448), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.array(tile, copy=True)).permute(2, 0, 1).contiguous()
    return x.float().div(255).sub_(MEAN).div_(STD)


def _upstream_grid(w: int, h: int, max_num: int, size: int = 448) -> tuple[int, int]:
    ratios = sorted({(i, j) for n in range(1, max_num + 1) for i in range(1, n + 1)
                     for j in range(1, n + 1) if 1 <= i * j <= max_num}, key=lambda r: r[0] * r[1])
    aspect, best, best_f = w / h, (1, 1), float("-inf")
    for r in ratios:
        t = r[0] / r[1]
        f = min(r[0] * r[1] * size * size / (w * h), 0.6) * min(t / aspect, aspect / t)
        if f > best_f:
            best, best_f = r, f
    return best


def upstream_image(data: bytes, max_num: int = 12) -> torch.Tensor:
    """load_image + dynamic_preprocess + per-tile transform, as the upstream worker runs them."""
    image = Image.open(io.BytesIO(data))
    cols, rows = _upstream_grid(*image.size, max_num)
    resized = image.resize((448 * cols, 448 * rows))
    tiles = [resized.crop((c * 448, r * 448, (c + 1) * 448, (r + 1) * 448))
             for r in range(rows) for c in range(cols)]
    if len(tiles) > 1:
        tiles.append(image.resize((448, 448)))
    return torch.stack([_upstream_transform(t) for t in tiles])


def _processor_resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as F

    return F.resize(x, [height, width], interpolation=F.InterpolationMode.BICUBIC)


def _processor_normalize(tiles: torch.Tensor) -> torch.Tensor:
    """The fast processor's fused rescale and normalise: (x / 255 - 0.5) / 0.5."""
    return tiles.float().mul(1 / 255).sub_(MEAN).div_(STD)


def processor_image(data: bytes, max_num: int = 12) -> torch.Tensor:
    """The Eagle2.5 processor's image path restated: a uint8 tensor resized to the grid by
    torchvision's F.resize, cropped row-major, the thumbnail resized from the whole image."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
    cols, rows = _upstream_grid(image.width, image.height, max_num)
    grid = _processor_resize(x, 448 * rows, 448 * cols)
    tiles = [grid[:, r * 448:(r + 1) * 448, c * 448:(c + 1) * 448]
             for r in range(rows) for c in range(cols)]
    if len(tiles) > 1:
        tiles.append(_processor_resize(x, 448, 448))
    return torch.stack([_processor_normalize(t) for t in tiles])


def ours_image(data: bytes, max_num: int = 12, kernel: str = "pillow") -> torch.Tensor:
    return tiler.tile_image(open_image(data).load(), max_tiles=max_num, kernel=kernel)


def upstream_video(path: str, n: int = 64) -> torch.Tensor:
    """The worker: decord at the video's size, each frame through Pillow's resize."""
    import decord

    vr = decord.VideoReader(path)
    idx = frames.sample_indices(len(vr), n)
    batch = vr.get_batch(idx).asnumpy()
    return torch.stack([_upstream_transform(Image.fromarray(f)) for f in batch])


def processor_video(path: str, n: int = 64) -> torch.Tensor:
    """The processor's resize on decord's frames (the worker's 64 frames, for comparison)."""
    import decord

    vr = decord.VideoReader(path)
    batch = vr.get_batch(frames.sample_indices(len(vr), n)).asnumpy()
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()
    return torch.stack([_processor_normalize(_processor_resize(f, 448, 448)) for f in x])


def ours_video(path: str, n: int = 64, kernel: str = "pillow") -> torch.Tensor:
    decoded = frames.decode_video(path, n, kernel=kernel)
    ours_video.decoded_per_sampled = decoded.decoded_frames / len(decoded.indices)
    return tiler.normalize(decoded.frames)


# each checkpoint style's upstream pipeline, and the kernel that reproduces it
PIPELINES = {"Eagle2 worker": ("pillow", upstream_image, upstream_video),
             "Eagle2.5 processor": ("torch", processor_image, processor_video)}


def levels(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest difference in 8-bit levels between two normalised tile stacks."""
    return int(round(float((a - b).abs().max()) * 127.5))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Over [0, 1] pixel values (undoing the 0.5/0.5 normalisation)."""
    mse = float(((a - b) * 0.5).pow(2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def inputs(cache: Path) -> dict[str, tuple[str, object]]:
    cache.mkdir(parents=True, exist_ok=True)
    photo = cache / "photo-4032x3024.jpg"
    if not photo.exists():
        photo.write_bytes(factory.encode(factory.photo(4032, 3024, seed=9), "JPEG", quality=92))
    doc = cache / "document-1275x1650.png"
    if not doc.exists():
        doc.write_bytes(factory.encode(factory.document(1275, 1650), "PNG"))
    shot = cache / "screenshot-1080x19200.png"
    if not shot.exists():
        shot.write_bytes(factory.encode(factory.document(1080, 19200), "PNG"))
    webp = cache / "photo-3840x2160.webp"
    if not webp.exists():
        webp.write_bytes(factory.encode(factory.photo(3840, 2160, seed=4), "WEBP", quality=90))
    bmp = cache / "photo-3000x2000.bmp"
    if not bmp.exists():
        bmp.write_bytes(factory.encode(factory.photo(3000, 2000, seed=5), "BMP"))
    video = cache / "video-120s-1280x720.mp4"
    if not video.exists():
        factory.video(video, seconds=120, fps=30, width=1280, height=720, gop_seconds=2)
    return {"4032x3024 photo (JPEG)": ("image", photo), "1275x1650 document (PNG)": ("image", doc),
            "1080x19200 screenshot (PNG)": ("image", shot),
            "3840x2160 photo (WebP)": ("image", webp),
            "3000x2000 photo (BMP, 24-bit)": ("image", bmp),
            "2 min 1280x720 H.264, 64 frames": ("video", video)}


def cpu_ms(fn, repeat: int = 3) -> float:
    """CPU time (all threads) per call, ms: what one input costs a host's cores."""
    fn()
    start = time.process_time()
    for _ in range(repeat):
        fn()
    return (time.process_time() - start) * 1000 / repeat


def decoder_candidates(cache: Path) -> list[dict]:
    """Each installed decoder on each bench input, decode only, at full size (median ms): how
    the decoders were chosen."""
    import io

    photo = (cache / "photo-4032x3024.jpg").read_bytes()
    files = {"JPEG photo": photo,
             "PNG document": (cache / "document-1275x1650.png").read_bytes(),
             "PNG screenshot": (cache / "screenshot-1080x19200.png").read_bytes(),
             "WebP 4K": (cache / "photo-3840x2160.webp").read_bytes(),
             "BMP 24-bit": (cache / "photo-3000x2000.bmp").read_bytes()}

    def pillow(data: bytes):
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    candidates = {"Pillow": pillow}
    try:
        import pyvips

        def vips(data: bytes):
            return pyvips.Image.new_from_buffer(data, "").numpy()
        candidates["libvips (pyvips)"] = vips
    except (ImportError, OSError):
        pass
    try:
        import simplejpeg

        candidates["simplejpeg"] = lambda d: simplejpeg.decode_jpeg(
            d) if d[:3] == b"\xff\xd8\xff" else None
    except ImportError:
        pass
    try:
        import pyspng

        candidates["pyspng"] = lambda d: pyspng.load(d) if d[:4] == b"\x89PNG" else None
    except ImportError:
        pass
    try:
        import cv2

        candidates["OpenCV"] = lambda d: cv2.imdecode(np.frombuffer(d, np.uint8),
                                                      cv2.IMREAD_COLOR)
    except ImportError:
        pass
    rows = []
    for name, data in files.items():
        row = {"input": name}
        for cand, fn in candidates.items():
            try:
                if fn(data) is None:
                    continue
                row[cand] = best_of(lambda f=fn, d=data: f(d), 5)[0] * 1000
            except Exception:  # a decoder without this format
                continue
        rows.append(row)
    return rows


def run(out: Path, repeat: int = 5) -> tuple[str, dict]:
    rows, record = [], []
    try:
        import decord  # noqa: F401

        have_decord = True
    except ImportError:
        have_decord = False
    for name, (kind, path) in inputs(out / ".cache").items():
        for style, (kernel, up_image, up_video) in PIPELINES.items():
            per_sampled = ""
            if kind == "image":
                data = path.read_bytes()
                t_up, up = best_of(lambda d=data, f=up_image: f(d), repeat)
                t_ours, ours = best_of(lambda d=data, k=kernel: ours_image(d, kernel=k), repeat)
                cpu = cpu_ms(lambda d=data, k=kernel: ours_image(d, kernel=k))
            else:
                if not have_decord:
                    rows.append([name, style, "-", "-", "-", "-", "decord not installed", "-"])
                    continue
                runs = max(1, repeat // 2)
                t_up, up = best_of(lambda p=str(path), f=up_video: f(p), runs)
                t_ours, ours = best_of(lambda p=str(path), k=kernel: ours_video(p, kernel=k),
                                       runs)
                cpu = cpu_ms(lambda p=str(path), k=kernel: ours_video(p, kernel=k), 1)
                per_sampled = f"{ours_video.decoded_per_sampled:.1f}"
            same = tuple(up.shape) == tuple(ours.shape)
            quality = psnr(up, ours) if same else float("nan")
            worst = levels(up, ours) if same else -1
            rows.append([name, style, tuple(ours.shape)[0], f"{t_up * 1000:.0f}",
                         f"{t_ours * 1000:.0f}", f"{t_up / t_ours:.2f}x",
                         "yes" if same else "NO", worst,
                         "inf" if quality == float("inf") else f"{quality:.1f}",
                         f"{1000 / cpu:.1f}", per_sampled or "-"])
            record.append({"input": name, "pipeline": style, "kernel": kernel,
                           "tiles": int(ours.shape[0]), "upstream_ms": t_up * 1000,
                           "ours_ms": t_ours * 1000, "speedup": t_up / t_ours,
                           "same_grid": same, "max_abs_diff_levels": worst, "psnr_db": quality,
                           "cpu_ms": cpu, "per_core_per_s": 1000 / cpu,
                           "decoded_per_sampled": per_sampled})
    text = table(f"Preprocessing: each upstream pipeline vs eagle-grpc (median ms, 12-tile cap, "
                 f"{os.cpu_count()} cores)",
                 ["input", "upstream pipeline", "tiles", "upstream ms", "ours ms", "speedup",
                  "same grid", "max |diff| (levels)", "PSNR dB", "per core per s",
                  "decoded per sampled frame"],
                 rows)
    decoders = decoder_candidates(out / ".cache")
    names = sorted({k for r in decoders for k in r if k != "input"})
    text += "\n" + table("Decoders, decode only, full size (median ms)",
                         ["input", *names],
                         [[r["input"], *(f"{r[n]:.1f}" if n in r else "-" for n in names)]
                          for r in decoders])
    return text, {"preprocess": record, "decoders": decoders}
