"""Media made on the fly for tests and benchmarks: photos, documents, H.264 clips."""
from __future__ import annotations

import io
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth, photo-like RGB image with some texture (gradients plus noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 127 + 100 * np.sin(x / (width / 6.0) + seed)
    g = 127 + 100 * np.cos(y / (height / 5.0))
    b = 127 + 100 * np.sin((x + y) / ((width + height) / 9.0))
    arr = np.stack([r, g, b], -1) + rng.normal(0, 12, (height, width, 1)).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def document(width: int, height: int) -> Image.Image:
    """A white page with lines of dark 'text' blocks, like a scanned document or screenshot."""
    im = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(im)
    rng = np.random.default_rng(1)
    for top in range(20, height - 20, 22):
        left = 30
        while left < width - 60:
            w = int(rng.integers(15, 60))
            draw.rectangle([left, top, left + w, top + 12], fill=(20, 20, 30))
            left += w + 8
    return im


def encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def video(path: str | Path | None, seconds: float, fps: int = 30, width: int = 320,
          height: int = 240, gop_seconds: float = 2.0, fmt: str = "mp4",
          pix_fmt: str = "yuv420p") -> bytes:
    """An H.264 clip whose frame i shows i as a grey level band, so decoded frames are identifiable.

    Written to `path` when given; the encoded bytes are returned either way.
    """
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.gop_size = max(1, int(gop_seconds * fps))
        stream.options = {"preset": "ultrafast", "bf": "0", "sc_threshold": "0"}
        base = photo(width, height, seed=3)
        base_arr = np.asarray(base).copy()
        n = int(seconds * fps)
        for i in range(n):
            arr = base_arr.copy()
            arr[: height // 8] = frame_level(i)  # top band encodes the frame index
            frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    data = buf.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data


def frame_level(i: int) -> int:
    """The grey level of frame i's top band (cycles every 50 frames, 5 levels apart)."""
    return 5 * (i % 50) + 2
