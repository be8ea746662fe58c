"""ADS budget: always fits, text is never cut, frames give way before tiles."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from preprocess.budget import ImageNeed, VideoNeed, fit_budget
from preprocess.errors import ContextOverflow
from preprocess.tiler import count_tiles

images = st.lists(st.builds(ImageNeed, st.integers(1, 8000), st.integers(1, 8000),
                            st.integers(1, 24)), max_size=4)
videos = st.lists(st.builds(VideoNeed, st.integers(1, 128), st.integers(1, 8)), max_size=3)


@settings(max_examples=300, deadline=None)
@given(ctx=st.integers(512, 40_000), text=st.integers(0, 8000), reserve=st.integers(0, 4096),
       ims=images, vids=videos, frame_text=st.integers(0, 20))
def test_result_fits_or_says_by_how_much(ctx, text, reserve, ims, vids, frame_text) -> None:
    try:
        b = fit_budget(context_length=ctx, text_tokens=text, max_new_tokens=reserve, images=ims,
                       videos=vids, tokens_per_frame_text=frame_text)
    except ContextOverflow as exc:
        # even the minimum does not fit: 1 tile per image, each video at its floor
        floor = (text + reserve + 256 * len(ims)
                 + (256 + frame_text) * sum(min(v.min_frames, v.frames) for v in vids))
        assert floor > ctx
        assert f"{floor - ctx:,} tokens over" in str(exc)
        return
    used = text + reserve + 256 * sum(b.image_tiles) + (256 + frame_text) * sum(b.video_frames)
    assert used == b.total_tokens <= ctx
    assert b.vision_tokens == 256 * (sum(b.image_tiles) + sum(b.video_frames))
    # tiles match IAP at the chosen caps; frames stay within [floor, requested]
    for im, cap, n in zip(ims, b.tile_caps, b.image_tiles):
        assert 1 <= cap <= im.max_tiles and n == count_tiles(im.width, im.height, max_tiles=cap)
    for v, f in zip(vids, b.video_frames):
        assert min(v.min_frames, v.frames) <= f <= v.frames
    # frames before tiles: if any tile cap was lowered, every video is at its floor
    if any(c < im.max_tiles for im, c in zip(ims, b.tile_caps)):
        assert all(f == min(v.min_frames, v.frames) for v, f in zip(vids, b.video_frames))
    # nothing is reduced when everything fits as asked
    asked = (text + reserve + 256 * sum(count_tiles(i.width, i.height, max_tiles=i.max_tiles)
                                        for i in ims)
             + (256 + frame_text) * sum(v.frames for v in vids))
    if asked <= ctx:
        assert b.adjustments == [] and b.total_tokens == asked


def test_adjustment_sentences_and_overflow_message() -> None:
    b = fit_budget(context_length=8192, text_tokens=100, max_new_tokens=1024,
                   images=[ImageNeed(4032, 3024, 12)], videos=[VideoNeed(64, 8)],
                   tokens_per_frame_text=12)
    assert b.video_frames == [13] and b.image_tiles == [13]
    assert b.adjustments == ["video 1: 64 frames reduced to 13 to fit the context"]
    b = fit_budget(context_length=4096, text_tokens=100, max_new_tokens=1024,
                   images=[ImageNeed(4032, 3024, 12)], videos=[VideoNeed(64, 4)])
    assert b.video_frames == [4] and b.image_tiles == [7]
    assert b.adjustments == [
        "video 1: 64 frames reduced to 4 to fit the context",
        "image 1: 13 tiles reduced to 7 (tile cap 12 lowered to 7) to fit the context"]
    with pytest.raises(ContextOverflow, match="the request needs 5,124 tokens .* but the context "
                                              "holds 4,096: 1,028 tokens over"):
        fit_budget(context_length=4096, text_tokens=5000, max_new_tokens=124, images=[],
                   videos=[])
