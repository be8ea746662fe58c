"""Video frame sampling and decoding (PyAV): segment-middle indices, seek-and-decode, limits."""
from __future__ import annotations

import io
import logging
import math
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction

import av
import numpy as np

from preprocess import tiler
from preprocess.errors import MediaError

log = logging.getLogger(__name__)

# PyAV's log level stays at its default (None: no Python log callback). A callback needs the
# GIL from FFmpeg's own threads, which deadlocks against a thread freeing a codec context.
# Demuxers we let FFmpeg use, chosen by magic bytes, never by FFmpeg's probe: a probe can
# pick the HLS or concat demuxers, which open further URLs named inside the file.
# A stream may end a little before the duration its container declares.
_END_SLACK_S = 0.25


@dataclass(frozen=True)
class VideoPolicy:
    """Limits applied to every video; none of them trusts the container's metadata alone."""

    max_bytes: int = 512 * 1024 * 1024
    max_frames: int = 256
    max_duration_s: float = 3 * 3600.0
    max_pixels: int = 4096 * 2304
    max_decoded_frames: int = 20_000
    timeout_s: float = 60.0
    threads: int = field(default_factory=lambda: os.cpu_count() or 2)  # every core
    # "cuda" or "cuda:N": decode on the GPU's NVDEC through FFmpeg's cuvid decoders (one
    # container: the engine is one), frames copied back for scaling; the CPU when the
    # device cannot be opened or the stream fails there. "": the CPU.
    hwaccel: str = ""


@dataclass
class VideoInfo:
    """What the container says about its first video stream."""

    width: int
    height: int
    fps: float
    total_frames: int
    duration_s: float
    container: str


@dataclass
class DecodedVideo:
    """Sampled frames: uint8 (n, size, size, 3) as the style's pipeline resizes them, their indices and times in seconds, and the
    rate they were sampled at (frames per second of video)."""

    frames: np.ndarray
    indices: list[int]
    timestamps: list[float]
    info: VideoInfo = field(repr=False)
    sample_fps: float = 0.0
    decoded_frames: int = 0  # frames the decoder produced to reach the sampled ones
    decoder: str = "cpu"  # or "cuda" (NVDEC); with why the CPU took over, when it did


@dataclass(frozen=True)
class FpsSampling:
    """The eagle_2_5_vl processor's frame choice (Qwen2.5-VL's rule): `fps` frames per second
    of video within [min_frames, the cap], an even count, spread by
    round(linspace(0, total - 1, n)). `requested` (the caller's count) replaces the fps
    rule, rounded to even."""

    fps: float = 2.0
    min_frames: int = 4
    requested: int = 0


_FACTOR = 2  # the processor's frame counts are multiples of this


def fps_frame_count(total_frames: int, video_fps: float, cap: int,
                    sampling: FpsSampling = FpsSampling()) -> int:
    """How many frames the processor samples from `total_frames` at `video_fps`, at most
    `cap`. Raises ValueError when fewer than 2 frames can be taken."""
    ceiling = min(cap, total_frames) // _FACTOR * _FACTOR
    if sampling.requested:
        n = min(round(sampling.requested / _FACTOR) * _FACTOR, ceiling)
    else:
        least = math.ceil(sampling.min_frames / _FACTOR) * _FACTOR
        n = total_frames / video_fps * sampling.fps
        n = min(max(n, least), ceiling, total_frames)
        n = int(n // _FACTOR * _FACTOR)
    if n < _FACTOR:
        raise ValueError(f"{total_frames} frames (cap {cap}) leave fewer than {_FACTOR} to "
                         f"sample")
    return n


def linspace_indices(total_frames: int, n: int) -> list[int]:
    """round(linspace(0, total_frames - 1, n)) as torch computes it in float32 (the step in
    float32, each point from the nearer end, rounded half to even), which the processor uses;
    float64 arithmetic picks a different frame about a third of the time on long videos."""
    if n == 1:
        return [0]
    end = float(total_frames - 1)
    step = float(np.float32(end / (n - 1)))
    i = np.arange(n, dtype=np.float64)
    half = n // 2
    points = np.where(i < half, step * i, end - step * (n - 1 - i)).astype(np.float32)
    return np.round(points).astype(np.int64).tolist()


def sample_indices(total_frames: int, num_frames: int) -> list[int]:
    """Upstream's choice: split [0, total_frames-1] into num_frames segments, take each middle.

    Indices may repeat when num_frames > total_frames, as upstream's do.
    """
    if total_frames < 1:
        raise ValueError(f"total_frames must be >= 1, got {total_frames}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    seg = float(total_frames - 1) / num_frames
    # np.round rounds half to even, which is what the upstream formula does.
    return [(int(np.round(seg * i)) + int(np.round(seg * (i + 1)))) // 2
            for i in range(num_frames)]


def sample_indices_fps(total_frames: int, video_fps: float, target_fps: float,
                       max_frames: int) -> list[int]:
    """One frame every 1/target_fps seconds (segment middles), at most max_frames of them."""
    if video_fps <= 0 or target_fps <= 0:
        raise ValueError(f"fps must be positive, got video_fps={video_fps}, "
                         f"target_fps={target_fps}")
    wanted = max(1, int(total_frames / video_fps * target_fps))
    return sample_indices(total_frames, min(wanted, max_frames))


def probe_video(source: str | bytes, policy: VideoPolicy = VideoPolicy(),
                label: str = "video") -> VideoInfo:
    """Open the container and check its stream against the policy, decoding nothing."""
    fmt = _container_format(source, policy, label)
    with _guard(label, "read"), _open(source, fmt) as container:
        return _info(container, fmt, policy, label)


def decode_video(source: str | bytes, num_frames: int, *, start_seconds: float = 0.0,
                 end_seconds: float = 0.0, size: int = 448,
                 policy: VideoPolicy = VideoPolicy(), label: str = "video",
                 sampling: FpsSampling | None = None, kernel: str = "pillow") -> DecodedVideo:
    """Sample frames of [start_seconds, end_seconds) and return them at size x size.

    Without `sampling`: `num_frames` frames, segment middles (the Eagle2 worker's rule);
    with it: the processor's fps rule, at most `num_frames`. `source` is a path or the
    encoded bytes. Frames are decoded by seeking to the keyframe before each sampled frame,
    on up to `policy.threads` threads, converted to RGB at the stream's own size (decord's
    pixels, which upstream reads) and resized by `kernel` (tiler.KERNELS) as the style's
    pipeline resizes them, a batch at a time. Rotation metadata is applied, as decord
    applies it. Raises MediaError on bad data or limits.
    """
    if kernel not in tiler.KERNELS:
        raise ValueError(f"kernel must be one of {tiler.KERNELS}, got {kernel!r}")
    if not 1 <= num_frames <= policy.max_frames:
        raise MediaError(f"{label}: {num_frames} frames requested, the limit is "
                         f"1 to {policy.max_frames}")
    info = probe_video(source, policy, label)
    first, last = _clip_range(info, start_seconds, end_seconds, label)
    span = last - first + 1
    if sampling is None:
        picked = sample_indices(span, num_frames)
    else:
        try:
            picked = linspace_indices(span, fps_frame_count(span, info.fps, num_frames,
                                                            sampling))
        except ValueError:
            raise MediaError(f"{label}: the clip has {span} frame(s); at least 2 are needed "
                             f"to sample it") from None
    indices = [first + i for i in picked]
    times = [i / info.fps for i in indices]
    sample_fps = len(indices) / span * info.fps
    deadline = time.monotonic() + policy.timeout_s
    parts, decoder = None, "cpu"
    if policy.hwaccel:
        hw = _hwaccel(policy.hwaccel)
        if isinstance(hw, str):
            decoder = f"cpu ({hw})"
        else:
            try:
                parts = [_decode_at(source, info, times, (size, kernel), deadline,
                                    policy.max_decoded_frames, label, 0, hw)]
                decoder = policy.hwaccel
            except MediaError as exc:  # the CPU decides whether the file is damaged
                decoder = f"cpu ({policy.hwaccel} failed: {exc})"
    if parts is None:
        parts = _decode_on_cores(source, info, times, (size, kernel), deadline, policy, label)
    frames = np.stack([f for part, _ in parts for f in part])
    return DecodedVideo(frames, indices, times, info, sample_fps,
                        sum(n for _, n in parts), decoder)


def _decode_on_cores(source: str | bytes, info: VideoInfo, times: list[float],
                     size: tuple[int, str], deadline: float, policy: VideoPolicy,
                     label: str) -> list[tuple[list[np.ndarray], int]]:
    """The CPU decode: one container per thread over contiguous stretches of `times`, the
    codec threads shared out so the cores are not oversubscribed."""
    chunks = _split(times, min(policy.threads, len(times)))
    budget = max(1, policy.max_decoded_frames // len(chunks))
    per_worker = max(1, (os.cpu_count() or 2) // len(chunks))

    def work(chunk: list[float]) -> tuple[list[np.ndarray], int]:
        return _decode_at(source, info, chunk, size, deadline, budget, label, per_worker)

    if len(chunks) == 1:
        return [work(chunks[0])]
    with ThreadPoolExecutor(len(chunks), thread_name_prefix="video-decode") as pool:
        return list(pool.map(work, chunks))


_HW_UNAVAILABLE: dict[str, str] = {}  # device -> why it could not be opened (not retried)


def _probe_clip() -> bytes:
    """Two 64x64 H.264 frames in MP4: what a hardware decoder is tried on first."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        for i in range(2):
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 60 * i, np.uint8), "rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return buf.getvalue()


def _hwaccel(device: str):
    """PyAV's HWAccel for "cuda" / "cuda:N", or a string saying why there is none. A device
    that failed to open once is not tried again in this process."""
    if device in _HW_UNAVAILABLE:
        return _HW_UNAVAILABLE[device]
    kind, _, index = device.partition(":")
    try:
        from av.codec.hwaccel import HWAccel, hwdevices_available

        if kind not in hwdevices_available():
            raise RuntimeError(f"this FFmpeg has no {kind} device support")
        hw = HWAccel(kind, device=index or None, allow_software_fallback=True)
        with av.open(io.BytesIO(_probe_clip()), mode="r", format="mp4", hwaccel=hw) as c:
            next(c.decode(c.streams.video[0]), None)  # opens the device, decodes one frame
        return hw
    except Exception as exc:
        why = f"{device} decoding unavailable: {type(exc).__name__}: {exc}"[:200]
        _HW_UNAVAILABLE[device] = why
        log.warning("%s; videos are decoded on the CPU", why)
        return why


def _decode_at(source: str | bytes, info: VideoInfo, targets: list[float],
               size: tuple[int, str], deadline: float, budget: int, label: str,
               threads: int = 0, hwaccel=None) -> tuple[list[np.ndarray], int]:
    """Decode the frames at `targets` (sorted seconds) from one container of its own and
    resize them to `size` = (side, kernel); also how many frames the decoder had to produce
    for them."""
    out = _Resizer(*size)
    with _guard(label, "decode"), _open(source, info.container, hwaccel) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if threads:
            stream.codec_context.thread_count = threads
        tb = stream.time_base or Fraction(1, 90000)
        t0 = float((stream.start_time or 0) * tb)
        half = 0.5 / info.fps
        frames = None
        held = None  # the last frame decoded, and its time
        gop = 2.0  # seconds between keyframes, refined from the keyframes seen
        last_key = None
        decoded = 0
        for t in targets:
            if held is not None and held[1] >= t - half:
                out.append(held[0])
                continue
            if frames is None or held is None or t - held[1] > gop:
                container.seek(int((t + t0) / tb), stream=stream, backward=True)
                frames = container.decode(stream)
            chosen = None
            for frame in frames:
                decoded += 1
                if decoded > budget:
                    raise MediaError(f"{label}: decoding needed more than {budget:,} frames, "
                                     f"the limit; the file's index may be damaged")
                if time.monotonic() > deadline:
                    raise MediaError(f"{label}: decoding took longer than the time limit")
                if frame.pts is None:
                    continue
                ft = float(frame.pts * tb) - t0
                if frame.key_frame:
                    if last_key is not None and ft - last_key > half:
                        gop = ft - last_key
                    last_key = ft
                held = (frame, ft)
                if ft >= t - half:
                    chosen = frame
                    break
            if chosen is None:  # the stream ended before t
                if held is None:
                    raise MediaError(f"{label}: no frame could be decoded")
                if t - held[1] > _END_SLACK_S + 2.0 / info.fps:
                    raise MediaError(f"{label}: the video's data ends at {held[1]:.2f} s but "
                                     f"its header claims {info.duration_s:.2f} s; the file is "
                                     f"truncated or its header is wrong")
                frames = iter(())
                chosen = held[0]
            out.append(chosen)
    return out.done(), decoded


def _upright(frame: av.VideoFrame) -> np.ndarray:
    """RGB (h, w, 3) at the stream's size, turned as the container's display matrix says
    (whole quarter turns, as decord turns them; a mirror matrix reads as a half turn)."""
    rgb = frame.to_ndarray(format="rgb24")
    turns = round((frame.rotation or 0) / 90) % 4
    return np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb


class _Resizer:
    """Frames converted to RGB at their own size as they are chosen, resized `batch` at a
    time: torch's kernel runs once per batch, and a batch of 4K frames is 200 MB at most."""

    batch = 8

    def __init__(self, side: int, kernel: str) -> None:
        self.side, self.kernel = side, kernel
        self.last: tuple[av.VideoFrame, np.ndarray] | None = None  # a repeat converts once
        self.pending: list[np.ndarray] = []
        self.out: list[np.ndarray] = []

    def append(self, frame: av.VideoFrame) -> None:
        if self.last is None or self.last[0] is not frame:
            self.last = (frame, _upright(frame))
        self.pending.append(self.last[1])
        if len(self.pending) >= self.batch:
            self._flush()

    def _flush(self) -> None:
        by_shape: list[list[np.ndarray]] = []  # a stream may change size: batches of one size
        for a in self.pending:
            if by_shape and by_shape[-1][0].shape == a.shape:
                by_shape[-1].append(a)
            else:
                by_shape.append([a])
        for same in by_shape:
            self.out += tiler.resize_frames(same, self.side, self.kernel)
        self.pending = []

    def done(self) -> list[np.ndarray]:
        self._flush()
        return self.out


def _clip_range(info: VideoInfo, start: float, end: float, label: str) -> tuple[int, int]:
    """Inclusive frame-index range of the clip [start, end) seconds; end 0 means the end."""
    if start < 0 or end < 0 or not math.isfinite(start) or not math.isfinite(end):
        raise MediaError(f"{label}: start_seconds and end_seconds must be finite and >= 0, "
                         f"got {start} and {end}")
    if end and end <= start:
        raise MediaError(f"{label}: end_seconds ({end}) must be after start_seconds ({start})")
    if start >= info.duration_s:
        raise MediaError(f"{label}: start_seconds ({start}) is past the end of the "
                         f"{info.duration_s:.2f}-second video")
    first = int(math.ceil(start * info.fps - 1e-9))
    last = info.total_frames - 1
    if end:
        last = min(last, int(math.ceil(end * info.fps - 1e-9)) - 1)
    return first, max(first, last)


def _info(container: av.container.InputContainer, fmt: str, policy: VideoPolicy,
          label: str) -> VideoInfo:
    if not container.streams.video:
        raise MediaError(f"{label}: the file has no video stream")
    stream = container.streams.video[0]
    w, h = stream.codec_context.width, stream.codec_context.height
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 0.0
    if w < 1 or h < 1 or not 0.1 <= fps <= 1000:
        raise MediaError(f"{label}: the video stream declares an unusable size {w}x{h} "
                         f"or frame rate {fps:g}")
    if w * h > policy.max_pixels:
        raise MediaError(f"{label}: the video is {w}x{h}, over the "
                         f"{policy.max_pixels:,}-pixel limit")
    if stream.duration is not None and stream.time_base:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / av.time_base
    else:
        duration = stream.frames / fps if stream.frames else 0.0
    total = int(stream.frames) or int(round(duration * fps))
    if total < 1 or duration <= 0:
        raise MediaError(f"{label}: the video declares no frames or no duration")
    if duration > policy.max_duration_s:
        raise MediaError(f"{label}: the video lasts {duration:.0f} s, over the "
                         f"{policy.max_duration_s:.0f}-second limit")
    # A header can claim more frames than its duration holds; trust the smaller.
    total = min(total, int(math.ceil(duration * fps)) + 1)
    return VideoInfo(w, h, fps, total, duration, fmt)


def _container_format(source: str | bytes, policy: VideoPolicy, label: str) -> str:
    if isinstance(source, bytes | bytearray | memoryview):
        if len(source) > policy.max_bytes:
            raise MediaError(f"{label}: the video is {len(source):,} bytes, over the "
                             f"{policy.max_bytes:,}-byte limit")
        head = bytes(source[:16])
    else:
        try:
            with open(source, "rb") as f:
                head = f.read(16)
        except OSError as exc:
            raise MediaError(f"{label}: cannot read the video ({exc.strerror})") from None
    if not head:
        raise MediaError(f"{label}: the video is empty (0 bytes)")
    if head[4:8] == b"ftyp" or head[4:8] in (b"moov", b"mdat", b"wide", b"free"):
        return "mov"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    raise MediaError(f"{label}: not a supported video container; send MP4/MOV, "
                     f"Matroska/WebM or AVI (first bytes {head[:8].hex()})")


def _open(source: str | bytes, fmt: str, hwaccel=None) -> av.container.InputContainer:
    src = io.BytesIO(source) if isinstance(source, bytes | bytearray | memoryview) else source
    return av.open(src, mode="r", format=fmt, timeout=(10.0, 10.0), hwaccel=hwaccel)


def _split(items: list[float], parts: int) -> list[list[float]]:
    """Contiguous chunks, so each decoder moves forward through its own stretch of the file."""
    parts = max(1, parts)
    size = math.ceil(len(items) / parts)
    return [items[i:i + size] for i in range(0, len(items), size)]


@contextmanager
def _guard(label: str, what: str) -> Iterator[None]:
    """Turns anything FFmpeg or PyAV raises into a MediaError naming the video."""
    try:
        yield
    except MediaError:
        raise
    except Exception as exc:  # PyAV raises FFmpegError subclasses, OSError, ValueError, ...
        text = str(exc) or type(exc).__name__
        raise MediaError(f"{label}: cannot {what} the video: it is damaged or not a "
                         f"video ({text[:120]})") from None
