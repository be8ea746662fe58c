"""The media and budget stages of one job: decode, fit the context (ADS), tile, tokenise."""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from preprocess import budget as ads
from preprocess import device_tiles, refs, tiler
from preprocess import frames as vid
from preprocess.errors import ContextOverflow, PreprocessError
from preprocess.media import ImagePolicy, OpenedImage, open_image
from service.engine import prompt as pr
from service.engine.job import ChatJob, ImagePart, Stage, VideoPart, timed
from service.engine.processor_prompt import SampledVideo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MediaSettings:
    """Limits and policies of the media stage."""

    image: ImagePolicy = ImagePolicy()
    video: vid.VideoPolicy = vid.VideoPolicy()
    refs: refs.RefPolicy = refs.RefPolicy()
    min_video_frames: int = 4
    norm: str = "siglip"
    prompt_style: str = "auto"  # auto, eagle2, eagle2.5 (processor_prompt.resolve_style)
    # frames per video at most, and when the request names none; 0: the style's own
    # (processor_prompt.FRAME_LIMITS: 64 and 32 for Eagle2, 256 and 256 for Eagle2.5)
    max_video_frames: int = 0
    default_video_frames: int = 0
    # JPEGs decoded by nvJPEG and tiled on the model's GPU when it has one
    # (preprocess.device_tiles); other formats and failures take the CPU path
    device_decode: bool = True


@dataclass
class VisionGroup:
    """The tiles of one image, or the frames of one video, and a key naming their content."""

    key: str
    tiles: np.ndarray | torch.Tensor  # (n, s, s, 3) uint8; a tensor when tiled on the device

    def pixel_values(self, norm: str, device: torch.device, dtype: torch.dtype,
                     start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Normalised tiles start..stop-1 (all by default) on `device` in `dtype`. For a
        GPU the uint8 tiles cross first and are normalised there: a quarter of the bytes
        over PCIe, and no float pass on the engine thread's CPU."""
        tiles = self.tiles[start:stop]
        if device.type == "cuda" and not isinstance(tiles, torch.Tensor):
            tiles = torch.from_numpy(np.ascontiguousarray(tiles)).to(device)
        return tiler.normalize(tiles, norm).to(device=device, dtype=dtype)


@dataclass
class Prepared:
    """A job ready for the scheduler: prompt ids and its vision groups in prompt order."""

    job: ChatJob
    ids: list[int]
    groups: list[VisionGroup]
    image_tiles: int
    video_frames: int
    adjustments: list[str]
    preprocess_ms: float
    ready_ns: int = 0  # wall clock when it joined the queue, for the trace
    constraint: object = None  # grammar.Constraint when the job has a response_format
    hashes: list[bytes] = field(default_factory=list)  # of its full KV blocks (kv.py)
    tail_media: list[str] = field(default_factory=list)  # media keys in its last partial block


class Preparer:
    """Everything between a ChatJob and token ids: needs the tokenizer and model config only."""

    def __init__(self, tokenizer, cfg, context_length: int, settings: MediaSettings,
                 decode_video=vid.decode_video, style=None,
                 device: torch.device | None = None) -> None:
        self.cfg = cfg
        # where JPEGs are tiled (device_tiles), None: on the CPU by the tiler
        self.device = device if settings.device_decode else None
        self._device_failed = False  # the first fallback is logged, not the rest
        self.decode_video = decode_video  # in process, or VideoDecoderPool.decode
        self.settings = settings
        self.context_length = context_length
        self.style = style or pr.WorkerPrompt()  # the checkpoint's prompt and frame sampler
        self.tokens = pr.PromptTokenizer(tokenizer, cfg.image_token_index)
        self.per_tile = cfg.patch_tokens
        worst = self.style.worst_frame_line
        self.frame_line_tokens = len(tokenizer(worst, add_special_tokens=False)["input_ids"]) + 2

    def __call__(self, job: ChatJob, stages: list[Stage] | None = None) -> Prepared:
        """The job's prompt ids and vision groups. With `stages`, each image's decode and
        tiling and each video's decode are recorded there, inside one eagle.preprocess."""
        with timed(stages, "eagle.preprocess") as attrs:
            prepared = self._prepare(job, stages)
            attrs.update({"eagle.image_tiles": prepared.image_tiles,
                          "eagle.video_frames": prepared.video_frames,
                          "eagle.prompt_tokens": len(prepared.ids),
                          "eagle.adjusted": bool(prepared.adjustments)})
        return prepared

    def _prepare(self, job: ChatJob, stages: list[Stage] | None) -> Prepared:
        start = time.perf_counter()
        with ExitStack() as stack:
            images = [p for m in job.messages for p in m.parts if isinstance(p, ImagePart)]
            videos = [p for m in job.messages for p in m.parts if isinstance(p, VideoPart)]
            opened = [self._open_image(p, k, stack) for k, p in enumerate(images)]
            image_keys = [o.key for o in opened]
            sources = [self._video_source(p, k, stack) for k, p in enumerate(videos)]
            video_keys = [_content_key(src) for src in sources]
            wanted = [min(p.num_frames or job.vision.max_video_frames,
                          job.vision.max_video_frames) for p in videos]
            skeleton = self.style.conversation(job.messages, [SampledVideo([]) for _ in videos],
                                               timestamps=job.vision.frame_timestamps)
            text_tokens = self.tokens.count_text(skeleton, job.cache_namespace)
            cap = job.vision.max_tiles_per_image if self.cfg.dynamic_image_size else 1
            try:
                plan = ads.fit_budget(
                    context_length=self.context_length, text_tokens=text_tokens,
                    max_new_tokens=job.sampling.max_new_tokens,
                    images=[ads.ImageNeed(*o.size, cap) for o in opened],
                    videos=[ads.VideoNeed(n, self.settings.min_video_frames) for n in wanted],
                    tokens_per_tile=self.per_tile,
                    tokens_per_frame_text=self.frame_line_tokens if job.vision.frame_timestamps
                    else self.frame_line_tokens // 2,
                    tile_size=self.cfg.image_size)
            except ContextOverflow as exc:
                exc.field = "messages"
                raise
            decoded = [self._decode_video(k, p, src, n, job.deadline, stages) for k, (p, src, n)
                       in enumerate(zip(videos, sources, plan.video_frames))]
            # several images are decoded at once: the decoders release the GIL
            per_image = list(_images_pool().map(
                lambda item: self._tile(*item, stages), zip(opened, plan.tile_caps, images))) \
                if len(opened) > 1 else [self._tile(o, c, p, stages) for o, c, p in
                                         zip(opened, plan.tile_caps, images)]
        segments = self.style.conversation(
            job.messages, [SampledVideo(d.timestamps, d.sample_fps) for d in decoded],
            timestamps=job.vision.frame_timestamps)
        counts = [t.shape[0] for t in per_image]
        ids = self.tokens.encode(segments, counts, self.per_tile, job.cache_namespace)
        if len(ids) + job.sampling.max_new_tokens > self.context_length:
            raise ContextOverflow(f"the prompt is {len(ids):,} tokens and {job.sampling.max_new_tokens:,} "
                                  f"more are reserved for the reply, over the "
                                  f"{self.context_length:,}-token context", field="messages")
        groups, seen_videos = [], set()
        for s in segments:  # a video's frame slots are contiguous: one group per video
            if not isinstance(s, pr.Slot):
                continue
            if s.image >= 0:
                key = f"{image_keys[s.image]}|tiles={plan.tile_caps[s.image]}"
                groups.append(VisionGroup(key, per_image[s.image]))
            elif s.video not in seen_videos:
                seen_videos.add(s.video)
                v = videos[s.video]
                key = (f"{video_keys[s.video]}|n={plan.video_frames[s.video]}|"
                       f"{v.start_seconds}-{v.end_seconds}")
                groups.append(VisionGroup(key, decoded[s.video].frames))
        # frames decoded: the plan's count for the worker's sampler, at most that for the
        # processor's (2 fps)
        frames = sum(len(d.timestamps) for d in decoded)
        return Prepared(job, ids, groups, sum(counts), frames, plan.adjustments,
                        (time.perf_counter() - start) * 1000)

    def _decode_video(self, k: int, part: VideoPart, source: str | bytes, frames: int,
                      deadline: float | None, stages: list[Stage] | None) -> vid.DecodedVideo:
        extra = {} if self.decode_video is vid.decode_video else {"deadline": deadline}
        if self.style.sampling is not None:  # the processor's rule; the caller's count if set
            extra["sampling"] = replace(self.style.sampling, requested=part.num_frames)
        with timed(stages, "eagle.media.decode", "eagle.preprocess", **{
                "eagle.media": f"video {k + 1}", "eagle.frames": frames}) as attrs:
            out = _labelled(part, lambda: self.decode_video(
                source, frames, start_seconds=part.start_seconds, end_seconds=part.end_seconds,
                size=self.cfg.image_size, policy=self.settings.video, label=f"video {k + 1}",
                kernel=self.style.resize_kernel, **extra))
            attrs.update({"eagle.decoder": out.decoder,
                          "eagle.decoded_frames": out.decoded_frames})
            return out

    def _open_image(self, part: ImagePart, k: int, stack: ExitStack) -> OpenedImage:
        label = f"image {k + 1}"
        data = part.data or self._read_ref(part.uri, label, part.field, stack, as_bytes=True)
        opened = _labelled(part, lambda: open_image(data, self.settings.image, label))
        opened.key = _content_key(data)
        return opened

    def _video_source(self, part: VideoPart, k: int, stack: ExitStack) -> str | bytes:
        return part.data or self._read_ref(part.uri, f"video {k + 1}", part.field, stack)

    def _read_ref(self, uri: str, label: str, field: str, stack: ExitStack,
                  as_bytes: bool = False) -> str | bytes:
        try:
            if refs.is_url(uri):
                return refs.fetch_url(uri, self.settings.refs, label)
            local = stack.enter_context(refs.open_local(uri, self.settings.refs, label))
            # the checked real path: a decoder process cannot use this process's descriptors
            return local.read() if as_bytes else str(local.path)
        except PreprocessError as exc:
            exc.field = exc.field or field
            raise

    def _tile(self, opened: OpenedImage, cap: int, part: ImagePart,
              stages: list[Stage] | None) -> np.ndarray | torch.Tensor:
        size = self.cfg.image_size
        media = {"eagle.media": opened.label}
        kernel = self.style.resize_kernel
        # the device resizes with torch's kernel only (Pillow's cannot run there)
        if (self.device is not None and kernel == "torch"
                and device_tiles.usable(opened.format, opened.image.mode)):
            with timed(stages, "eagle.tiling", "eagle.preprocess", **media,
                       **{"eagle.format": opened.format, "eagle.decoder": "device"}) as attrs:
                try:
                    tiles = device_tiles.jpeg_tiles(
                        opened.data, opened.orientation, device=self.device, max_tiles=cap,
                        tile_size=size, use_thumbnail=self.cfg.use_thumbnail)
                    attrs["eagle.tiles"] = tiles.shape[0]
                    return tiles
                except Exception as exc:  # damaged or unsupported: the CPU path decides
                    attrs["eagle.decoder"] = "device, fell back to cpu"
                    if not self._device_failed:
                        self._device_failed = True
                        log.warning("a JPEG could not be tiled on %s (%s); it and any like it "
                                    "take the CPU path", self.device, exc)
        with timed(stages, "eagle.media.decode", "eagle.preprocess", **media,
                   **{"eagle.format": opened.format, "eagle.width": opened.size[0],
                      "eagle.height": opened.size[1]}):
            image = _labelled(part, opened.load)
        with timed(stages, "eagle.tiling", "eagle.preprocess", **media,
                   **{"eagle.resize": kernel}) as attrs:
            tiles = tiler.split_tiles(image, max_tiles=cap, tile_size=size,
                                      use_thumbnail=self.cfg.use_thumbnail, kernel=kernel)
            attrs["eagle.tiles"] = tiles.shape[0]
        return tiles


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _images_pool() -> ThreadPoolExecutor:
    """Threads that decode and tile a request's images side by side."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max(2, min(4, os.cpu_count() or 2)),
                                       thread_name_prefix="image-decode")
        return _POOL


def _content_key(source: str | bytes) -> str:
    """What identifies media for the vision cache: a hash of bytes, or a file's identity."""
    if isinstance(source, bytes | bytearray | memoryview):
        return "sha256:" + hashlib.sha256(source).hexdigest()
    st = os.stat(source)  # an open file under a media root (/proc/self/fd/N)
    return f"file:{os.path.realpath(source)}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def _labelled(part, fn):
    """Run fn, stamping any preprocessing error with the request path of `part`."""
    try:
        return fn()
    except PreprocessError as exc:
        exc.field = exc.field or part.field
        raise
