"""Preprocessing: the upstream worker's pipeline, restated step by step, against ours."""
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


def ours_image(data: bytes, max_num: int = 12) -> torch.Tensor:
    opened = open_image(data)
    cols, rows = tiler.choose_grid(*opened.size, max_tiles=max_num)
    image = opened.load(min_size=(448 * cols, 448 * rows))
    return tiler.tile_image(image, max_tiles=max_num)


def upstream_video(path: str, n: int = 64) -> torch.Tensor:
    import decord

    vr = decord.VideoReader(path)
    idx = frames.sample_indices(len(vr), n)
    batch = vr.get_batch(idx).asnumpy()
    return torch.stack([_upstream_transform(Image.fromarray(f)) for f in batch])


def ours_video(path: str, n: int = 64) -> torch.Tensor:
    decoded = frames.decode_video(path, n)
    ours_video.decoded_per_sampled = decoded.decoded_frames / len(decoded.indices)
    return tiler.normalize(decoded.frames)


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
    """Each installed decoder on each bench input, decode only (median ms): how the decoders
    were chosen. JPEG at the 1/2 DCT scale the photo's grid allows."""
    import io

    photo = (cache / "photo-4032x3024.jpg").read_bytes()
    files = {"JPEG photo": photo,
             "PNG document": (cache / "document-1275x1650.png").read_bytes(),
             "PNG screenshot": (cache / "screenshot-1080x19200.png").read_bytes(),
             "WebP 4K": (cache / "photo-3840x2160.webp").read_bytes(),
             "BMP 24-bit": (cache / "photo-3000x2000.bmp").read_bytes()}

    def pillow(data: bytes):
        im = Image.open(io.BytesIO(data))
        if im.format == "JPEG":
            im.draft("RGB", (im.size[0] // 2, im.size[1] // 2))
        return np.asarray(im.convert("RGB"))

    candidates = {"Pillow": pillow}
    try:
        import pyvips

        def vips(data: bytes):
            kw = {"shrink": 2} if data[:3] == b"\xff\xd8\xff" else {}
            return pyvips.Image.new_from_buffer(data, "", **kw).numpy()
        candidates["libvips (pyvips)"] = vips
    except (ImportError, OSError):
        pass
    try:
        import simplejpeg

        candidates["simplejpeg"] = lambda d: simplejpeg.decode_jpeg(
            d, min_height=1344, min_width=1792) if d[:3] == b"\xff\xd8\xff" else None
    except ImportError:
        pass
    try:
        import pyspng

        candidates["pyspng"] = lambda d: pyspng.load(d) if d[:4] == b"\x89PNG" else None
    except ImportError:
        pass
    try:
        import cv2

        candidates["OpenCV"] = lambda d: cv2.imdecode(np.frombuffer(d, np.uint8), (
            cv2.IMREAD_REDUCED_COLOR_2 if d[:3] == b"\xff\xd8\xff" else cv2.IMREAD_COLOR))
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
        per_sampled = ""
        if kind == "image":
            data = path.read_bytes()
            t_up, up = best_of(lambda d=data: upstream_image(d), repeat)
            t_ours, ours = best_of(lambda d=data: ours_image(d), repeat)
            cpu = cpu_ms(lambda d=data: ours_image(d))
        else:
            if not have_decord:
                rows.append([name, "-", "-", "-", "-", "decord not installed", "-"])
                continue
            t_up, up = best_of(lambda p=str(path): upstream_video(p), max(1, repeat // 2))
            t_ours, ours = best_of(lambda p=str(path): ours_video(p), max(1, repeat // 2))
            cpu = cpu_ms(lambda p=str(path): ours_video(p), 1)
            per_sampled = f"{ours_video.decoded_per_sampled:.1f}"
        same = tuple(up.shape) == tuple(ours.shape)
        quality = psnr(up, ours) if same else float("nan")
        worst = min(psnr(u, o) for u, o in zip(up, ours)) if same else float("nan")
        rows.append([name, tuple(ours.shape)[0], f"{t_up * 1000:.0f}", f"{t_ours * 1000:.0f}",
                     f"{t_up / t_ours:.2f}x", "yes" if same else "NO", f"{quality:.1f} / {worst:.1f}",
                     f"{1000 / cpu:.1f}", per_sampled or "-"])
        record.append({"input": name, "tiles": int(ours.shape[0]), "upstream_ms": t_up * 1000,
                       "ours_ms": t_ours * 1000, "speedup": t_up / t_ours, "same_grid": same,
                       "psnr_db": quality, "min_tile_psnr_db": worst, "cpu_ms": cpu,
                       "per_core_per_s": 1000 / cpu, "decoded_per_sampled": per_sampled})
    text = table(f"Preprocessing: upstream pipeline vs eagle-grpc (median ms, 12-tile cap, "
                 f"{os.cpu_count()} cores)",
                 ["input", "tiles", "upstream ms", "ours ms", "speedup", "same grid",
                  "PSNR dB (all / worst tile)", "per core per s", "decoded per sampled frame"],
                 rows)
    decoders = decoder_candidates(out / ".cache")
    names = sorted({k for r in decoders for k in r if k != "input"})
    text += "\n" + table("Decoders, decode only (median ms; JPEG at 1/2 scale)",
                         ["input", *names],
                         [[r["input"], *(f"{r[n]:.1f}" if n in r else "-" for n in names)]
                          for r in decoders])
    return text, {"preprocess": record, "decoders": decoders}
