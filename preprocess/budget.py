"""Automatic Degrade Sampling at inference: fit vision tokens into the context, text untouched."""
from __future__ import annotations

from dataclasses import dataclass, field

from preprocess.errors import ContextOverflow
from preprocess.tiler import count_tiles


@dataclass(frozen=True)
class ImageNeed:
    """An image's size and its requested tile cap."""

    width: int
    height: int
    max_tiles: int


@dataclass(frozen=True)
class VideoNeed:
    """A video's requested frame count and its floor (fewer frames are never used)."""

    frames: int
    min_frames: int = 4


@dataclass
class Budget:
    """The plan: per-image tile caps and tile counts, per-video frame counts, and what changed."""

    tile_caps: list[int]
    image_tiles: list[int]
    video_frames: list[int]
    vision_tokens: int
    total_tokens: int
    adjustments: list[str] = field(default_factory=list)


def fit_budget(*, context_length: int, text_tokens: int, max_new_tokens: int,
               images: list[ImageNeed], videos: list[VideoNeed], tokens_per_tile: int = 256,
               tokens_per_frame_text: int = 0, tile_size: int = 448) -> Budget:
    """Choose tile caps and frame counts so everything fits `context_length`.

    `text_tokens` is the exact count of the prompt's text (never cut); `tokens_per_frame_text`
    the text each video frame adds (its "Frame i ..." line and image tags). Video frames go
    first (evenly, down to each floor), then image tile caps are lowered one step at a time
    (IAP re-run at each cap). Raises ContextOverflow saying by how many tokens the minimum
    is still over.
    """
    frames = [v.frames for v in videos]
    floors = [min(v.min_frames, v.frames) for v in videos]
    caps = [i.max_tiles for i in images]
    per_frame = tokens_per_tile + tokens_per_frame_text

    def tiles_for(cs: list[int]) -> list[int]:
        return [count_tiles(im.width, im.height, max_tiles=c, tile_size=tile_size)
                for im, c in zip(images, cs)]

    def total(tiles: list[int], fs: list[int]) -> int:
        return text_tokens + max_new_tokens + tokens_per_tile * sum(tiles) + per_frame * sum(fs)

    tiles = tiles_for(caps)
    # 1. Frames give way first: take one frame at a time from the video that has most left.
    while total(tiles, frames) > context_length:
        spare = [(f - lo, -j) for j, (f, lo) in enumerate(zip(frames, floors)) if f > lo]
        if not spare:
            break
        j = -max(spare)[1]
        frames[j] -= 1
    # 2. Then tiles: lower the highest cap by one, re-running IAP, until it fits.
    while total(tiles, frames) > context_length and max(caps, default=1) > 1:
        top = max(caps)
        caps = [min(c, top - 1) for c in caps]
        tiles = tiles_for(caps)
    need = total(tiles, frames)
    if need > context_length:
        raise ContextOverflow(
            f"the request needs {need:,} tokens ({text_tokens:,} of text, {max_new_tokens:,} "
            f"reserved for the reply, the rest for images and video at their minimum) but the "
            f"context holds {context_length:,}: {need - context_length:,} tokens over; shorten "
            f"the text, send fewer images or frames, or lower max_new_tokens")
    notes = [f"video {j + 1}: {v.frames} frames reduced to {f} to fit the context"
             for j, (v, f) in enumerate(zip(videos, frames)) if f < v.frames]
    before = tiles_for([i.max_tiles for i in images])
    notes += [f"image {k + 1}: {b} tiles reduced to {a} (tile cap {im.max_tiles} lowered to "
              f"{c}) to fit the context"
              for k, (im, b, a, c) in enumerate(zip(images, before, tiles, caps)) if a < b]
    vision = tokens_per_tile * (sum(tiles) + sum(frames))
    return Budget(caps, tiles, frames, vision, need, notes)
