"""Pixel fidelity: the frames and tiles the model sees equal what upstream's own pipelines make
from the same file. The references here are written from upstream's code, not from ours:
decord at the video's own size (the reader both upstream pipelines use), then the Eagle2
worker's Pillow resize or the Eagle2.5 processor's torchvision F.resize; for images, the
worker's dynamic_preprocess on a PIL image and the processor's tiling on a uint8 tensor."""
from __future__ import annotations

import io
import struct
from dataclasses import replace

import factory
import numpy as np
import pytest
import torch
from PIL import Image
from test_tiler import upstream_grid

from preprocess import frames as vid
from preprocess import tiler
from preprocess.media import open_image
from service.engine.job import (
    ChatJob,
    ChatMessage,
    ImagePart,
    Role,
    TextPart,
    VideoPart,
    VisionParams,
)
from service.engine.prepare import MediaSettings, Preparer
from service.engine.processor_prompt import ProcessorPrompt

decord = pytest.importorskip("decord")  # the dev extra: upstream's video reader
F = pytest.importorskip("torchvision.transforms.v2.functional")

STYLES = ("pillow", "torch")  # the Eagle2 worker's, the Eagle2.5 processor's


# ---- upstream, restated from its code ----

def worker_tile(image: Image.Image, size: int = 448) -> np.ndarray:
    """A frame through the worker: dynamic_preprocess(max_num=1) is image.resize((448, 448))
    (Pillow's default filter for RGB, bicubic); its transform's Resize is then a no-op."""
    return np.asarray(image.resize((size, size)))


def processor_resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The processor's F.resize on a uint8 CHW tensor (bicubic; antialias is v2's default)."""
    return F.resize(x, [height, width], interpolation=F.InterpolationMode.BICUBIC)


def upstream_frames(path: str, indices: list[int], style: str) -> np.ndarray:
    batch = decord.VideoReader(path).get_batch(indices).asnumpy()  # (n, h, w, 3) RGB
    if style == "pillow":
        return np.stack([worker_tile(Image.fromarray(f)) for f in batch])
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()
    return torch.stack([processor_resize(f, 448, 448) for f in x]).permute(0, 2, 3, 1).numpy()


def upstream_tiles(data: bytes, style: str, max_num: int = 12, size: int = 448) -> np.ndarray:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    cols, rows = upstream_grid(*image.size, 1, max_num)  # the worker's rule, restated
    boxes = [(c * size, r * size, (c + 1) * size, (r + 1) * size)
             for r in range(rows) for c in range(cols)]
    if style == "pillow":  # dynamic_preprocess
        resized = image.resize((size * cols, size * rows))
        tiles = [np.asarray(resized.crop(b)) for b in boxes]
        if len(tiles) > 1:
            tiles.append(np.asarray(image.resize((size, size))))
        return np.stack(tiles)
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()  # _get_image_patches
    resized = processor_resize(x, size * rows, size * cols)
    tiles = [resized[:, b[1]:b[3], b[0]:b[2]] for b in boxes]
    if len(tiles) > 1:
        tiles.append(processor_resize(x, size, size))
    return torch.stack(tiles).permute(0, 2, 3, 1).numpy()


# ---- inputs ----

def rotated(data: bytes) -> bytes:
    """The MP4 with its track's display matrix turned a quarter (a phone held upright)."""
    out = bytearray(data)
    matrix = out.find(b"tkhd") + 4 + 40  # version 0 tkhd: 40 bytes before the matrix
    out[matrix:matrix + 36] = struct.pack(">9i", 0, 0x10000, 0, -0x10000, 0, 0, 0, 0, 1 << 30)
    return bytes(out)


CLIPS = {"448x448": (448, 448), "640x360": (640, 360), "1280x720": (1280, 720),
         "1920x1080": (1920, 1080), "portrait 720x1280": (720, 1280),
         "odd 854x481": (854, 481), "rotated 640x360": (640, 360)}


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("fidelity")
    out = {}
    for name, (w, h) in CLIPS.items():
        # 4:2:0 needs even sides: the odd clip is 4:4:4, as encoders store odd sizes
        data = factory.video(None, seconds=1, fps=10, width=w, height=h,
                             pix_fmt="yuv444p" if w % 2 or h % 2 else "yuv420p")
        path = root / f"{name.replace(' ', '-')}.mp4"
        path.write_bytes(rotated(data) if name.startswith("rotated") else data)
        out[name] = str(path)
    return out


def diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


# ---- frames ----

@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("name", list(CLIPS))
def test_frames_equal_upstreams(clips, name: str, style: str) -> None:
    ours = vid.decode_video(clips[name], 4, kernel=style)
    ref = upstream_frames(clips[name], ours.indices, style)
    assert diff(ours.frames, ref) <= 1
    assert np.array_equal(ours.frames, ref)  # the same decoder and kernel: the same bytes


def test_the_rotated_clip_is_turned_upright(clips) -> None:
    import av

    turned = vid.decode_video(clips["rotated 640x360"], 4, kernel="torch")
    with av.open(clips["640x360"]) as c:  # the same pixels stored without the matrix
        stored = list(c.decode(video=0))
    # the matrix turns the picture a quarter clockwise: 360 wide, 640 high before the resize
    upright = [np.rot90(stored[i].to_ndarray(format="rgb24"), -1) for i in turned.indices]
    assert upright[0].shape == (640, 360, 3)
    assert np.array_equal(turned.frames, np.stack(tiler.resize_frames(upright, 448, "torch")))


def test_the_old_decoder_scaled_frames_were_far_off(clips) -> None:
    """What the service fed the model before: swscale to 448x448 straight from YUV."""
    ours = vid.decode_video(clips["640x360"], 4, kernel="torch")
    import av

    with av.open(clips["640x360"]) as c:
        frames = list(c.decode(video=0))
    old = np.stack([frames[i].to_ndarray(width=448, height=448, format="rgb24",
                                         interpolation="BICUBIC") for i in ours.indices])
    assert diff(old, ours.frames) > 20


# ---- tiles ----

BENCH_IMAGES = {  # the preprocess bench's inputs (bench/preprocess_bench.py)
    "4032x3024 photo (JPEG)": lambda: factory.encode(factory.photo(4032, 3024, seed=9), "JPEG",
                                                     quality=92),
    "1275x1650 document (PNG)": lambda: factory.encode(factory.document(1275, 1650), "PNG"),
    "1080x19200 screenshot (PNG)": lambda: factory.encode(factory.document(1080, 19200), "PNG"),
    "3840x2160 photo (WebP)": lambda: factory.encode(factory.photo(3840, 2160, seed=4), "WEBP",
                                                     quality=90),
    "3000x2000 photo (BMP)": lambda: factory.encode(factory.photo(3000, 2000, seed=5), "BMP"),
    "300x200 photo (PNG, upscaled)": lambda: factory.encode(factory.photo(300, 200), "PNG"),
}


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("name", list(BENCH_IMAGES))
def test_tiles_equal_upstreams(name: str, style: str) -> None:
    data = BENCH_IMAGES[name]()
    ours = tiler.split_tiles(open_image(data).load(), max_tiles=12, kernel=style)
    ref = upstream_tiles(data, style)
    assert diff(ours, ref) <= 1
    assert np.array_equal(ours, ref)


# ---- through the preparer: each style picks its kernel ----

def _job(*parts) -> ChatJob:
    return ChatJob("fidelity", (ChatMessage(Role.USER, (*parts, TextPart("Describe."))),),
                   vision=VisionParams(max_tiles_per_image=6, max_video_frames=8))


def test_the_preparer_resizes_with_its_styles_kernel(tiny, clips) -> None:
    data = factory.encode(factory.photo(1000, 560, seed=2), "PNG")
    video = open(clips["1280x720"], "rb").read()
    for style, kernel in ((None, "pillow"), (ProcessorPrompt(tiny.tokenizer), "torch")):
        prep = Preparer(tiny.tokenizer, tiny.cfg, 32768, MediaSettings(), style=style)
        out = prep(_job(ImagePart(data=data), VideoPart(data=video, num_frames=4)))
        image, frames = out.groups
        assert np.array_equal(image.tiles, upstream_tiles(data, kernel, max_num=6))
        sampling = prep.style.sampling and replace(prep.style.sampling, requested=4)
        picked = vid.decode_video(video, 4, kernel=kernel, sampling=sampling)
        assert np.array_equal(frames.tiles, upstream_frames(clips["1280x720"], picked.indices,
                                                            kernel))
