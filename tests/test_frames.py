"""Video sampling and decoding: upstream indices, identifiable frames, clips, damaged files."""
from __future__ import annotations

import time
from pathlib import Path

import factory
import numpy as np
import pytest
import torch

from preprocess import frames
from preprocess.errors import MediaError


def upstream_indices(total: int, n: int) -> list[int]:
    """The upstream worker's get_seq_frames, restated."""
    seg = float(total - 1) / n
    return [(int(np.round(seg * i)) + int(np.round(seg * (i + 1)))) // 2 for i in range(n)]


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> tuple[Path, bytes]:
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    data = factory.video(path, seconds=10, fps=30, gop_seconds=2)
    return path, data


def _levels(decoded: frames.DecodedVideo) -> list[int]:
    return [int(np.median(f[:40, :, 0])) for f in decoded.frames]


def test_indices_equal_the_upstream_formula() -> None:
    for total in (1, 2, 3, 10, 17, 300, 3600, 10007):
        for n in (1, 2, 7, 8, 16, 64, 256):
            assert frames.sample_indices(total, n) == upstream_indices(total, n), (total, n)
    assert frames.sample_indices(300, 8) == [18, 56, 93, 131, 168, 205, 243, 280]
    with pytest.raises(ValueError, match="num_frames must be >= 1, got 0"):
        frames.sample_indices(10, 0)


def test_fps_sampling_takes_one_frame_per_period_up_to_the_cap() -> None:
    assert len(frames.sample_indices_fps(300, 30.0, 2.0, 256)) == 20
    assert len(frames.sample_indices_fps(3600, 30.0, 2.0, 64)) == 64


def test_decoded_frames_are_the_sampled_ones_with_their_times(clip) -> None:
    path, data = clip
    out = frames.decode_video(str(path), 8)
    assert out.frames.shape == (8, 448, 448, 3) and out.frames.dtype == np.uint8
    assert out.indices == upstream_indices(300, 8)
    assert out.timestamps == pytest.approx([i / 30 for i in out.indices])
    expected = [factory.frame_level(i) for i in out.indices]
    assert all(abs(a - b) <= 3 for a, b in zip(_levels(out), expected)), (_levels(out), expected)
    from_bytes = frames.decode_video(data, 8)
    assert np.array_equal(from_bytes.frames, out.frames)


def test_decoding_seeks_to_keyframes_and_any_thread_count_gives_the_same_frames(clip) -> None:
    _, data = clip  # 300 frames, a keyframe every 60
    one = frames.decode_video(data, 8, policy=frames.VideoPolicy(threads=1))
    many = frames.decode_video(data, 8, policy=frames.VideoPolicy(threads=4))
    assert np.array_equal(one.frames, many.frames)
    # each sampled frame costs at most the 60 frames from its keyframe, never the whole file
    for out in (one, many):
        assert 8 <= out.decoded_frames <= 8 * 60, out.decoded_frames
    assert one.decoded_frames < 300


def test_a_clip_samples_only_its_range(clip) -> None:
    _, data = clip
    out = frames.decode_video(data, 4, start_seconds=2.0, end_seconds=4.0)
    assert all(60 <= i < 120 for i in out.indices), out.indices
    assert out.indices == [60 + i for i in upstream_indices(60, 4)]
    expected = [factory.frame_level(i) for i in out.indices]
    assert all(abs(a - b) <= 3 for a, b in zip(_levels(out), expected))


def test_more_frames_than_the_video_has_repeat_frames(clip) -> None:
    short = factory.video(None, seconds=0.2, fps=30)  # 6 frames
    out = frames.decode_video(short, 16)
    assert out.frames.shape[0] == 16 and out.indices == upstream_indices(6, 16)


@pytest.mark.parametrize("start,end,reason", [
    (5.0, 3.0, "end_seconds (3.0) must be after start_seconds (5.0)"),
    (-1.0, 0.0, "must be finite and >= 0"),
    (60.0, 0.0, "past the end of the 10.00-second video"),
])
def test_bad_clip_bounds(clip, start: float, end: float, reason: str) -> None:
    with pytest.raises(MediaError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        frames.decode_video(clip[1], 4, start_seconds=start, end_seconds=end)


def test_limits(clip) -> None:
    _, data = clip
    with pytest.raises(MediaError, match="300 frames requested, the limit is 1 to 256"):
        frames.decode_video(data, 300)
    with pytest.raises(MediaError, match="the video is 320x240, over the 64,000-pixel limit"):
        frames.decode_video(data, 4, policy=frames.VideoPolicy(max_pixels=320 * 200))
    with pytest.raises(MediaError, match="the video lasts 10 s, over the 5-second limit"):
        frames.decode_video(data, 4, policy=frames.VideoPolicy(max_duration_s=5))
    with pytest.raises(MediaError, match="over the 1,000-byte limit"):
        frames.decode_video(data, 4, policy=frames.VideoPolicy(max_bytes=1000))


@pytest.mark.parametrize("name", ["random", "empty", "truncated mp4", "lying mkv",
                                  "corrupt middle", "m3u8 playlist"])
def test_damaged_videos_fail_fast_with_media_error(clip, name: str) -> None:
    _, data = clip
    mkv = factory.video(None, seconds=10, fps=30, fmt="matroska")
    cases = {
        "random": np.random.default_rng(0).bytes(50_000),
        "empty": b"",
        "truncated mp4": data[: len(data) // 2],
        "lying mkv": mkv[: len(mkv) // 3],  # the header still says 10 s
        "corrupt middle": data[:2000] + np.random.default_rng(1).bytes(len(data) - 4000)
        + data[-2000:],
        "m3u8 playlist": b"#EXTM3U\n#EXTINF:10,\nhttp://127.0.0.1:9/x.ts\nfile:///etc/passwd\n",
    }
    start = time.monotonic()
    with pytest.raises(MediaError) as info:
        frames.decode_video(cases[name], 8)
    assert time.monotonic() - start < 10
    assert str(info.value).startswith("video: ")


def test_nvdec_that_cannot_open_leaves_the_cpu_decoding_and_says_why(clip, monkeypatch) -> None:
    _, data = clip
    cpu = frames.decode_video(data, 8)
    monkeypatch.setattr(frames, "_HW_UNAVAILABLE", {})
    tries = []
    real = frames._probe_clip
    monkeypatch.setattr(frames, "_probe_clip", lambda: tries.append(1) or real())
    policy = frames.VideoPolicy(hwaccel="cuda")
    for _ in range(2):
        out = frames.decode_video(data, 8, policy=policy)
        assert np.array_equal(out.frames, cpu.frames) and out.indices == cpu.indices
        if not torch.cuda.is_available():
            assert out.decoder.startswith("cpu (cuda decoding unavailable: ")
    assert len(tries) <= 1  # a device that failed is not tried on every video


def test_the_nvdec_path_decodes_in_one_container_and_a_failure_there_goes_to_the_cpu(
        clip, monkeypatch) -> None:
    _, data = clip
    cpu = frames.decode_video(data, 8)
    policy = frames.VideoPolicy(hwaccel="cuda")
    monkeypatch.setattr(frames, "_hwaccel", lambda device: None)  # a device that opened
    one = frames.decode_video(data, 8, policy=policy)
    assert one.decoder == "cuda" and np.array_equal(one.frames, cpu.frames)
    assert 8 <= one.decoded_frames <= 8 * 60
    monkeypatch.setattr(frames, "_hwaccel", lambda device: "not a device")
    assert frames.decode_video(data, 8, policy=policy).decoder == "cpu (not a device)"
    monkeypatch.setattr(frames, "_hwaccel", lambda device: object())  # fails inside av.open
    out = frames.decode_video(data, 8, policy=policy)
    assert out.decoder.startswith("cpu (cuda failed: video: cannot decode the video")
    assert np.array_equal(out.frames, cpu.frames)
    with pytest.raises(MediaError, match="cannot"):  # a damaged file is still refused
        frames.decode_video(data[:2000], 8, policy=policy)
