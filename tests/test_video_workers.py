"""Video decoding in killable child processes: hangs, crashes and memory hogs fail one request."""
from __future__ import annotations

import os
import time
from pathlib import Path

import factory
import faulty_decoders
import numpy as np
import pytest

from preprocess import frames
from preprocess.errors import MediaError
from service.engine.video_workers import VideoDecoderPool

CLIP = factory.video(None, seconds=2, fps=10)


def _noop() -> None:
    pass


def test_a_fork_server_started_without_the_preload_costs_the_start_not_the_decode() -> None:
    """Another pool (the grammar compilers) may start the fork server first; then the preload
    does not apply and each worker imports torch itself. That start is waited for apart from
    the decode's time limit, so a tight limit still passes a good file."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    first = ctx.Process(target=_noop)  # the fork server runs from here on, whoever asked
    first.start()
    first.join()
    p = VideoDecoderPool(workers=1, timeout_s=0.5, memory_mb=1024)
    try:
        out = p.decode(CLIP, 4, label="video 1")
        assert out.indices == [2, 7, 12, 16]
        assert p.replaced == 0
    finally:
        p.close()


@pytest.fixture(scope="module")
def pool():
    p = VideoDecoderPool(workers=1, timeout_s=2.0, memory_mb=1024)
    yield p
    p.close()


def test_decodes_like_in_process(pool) -> None:
    out = pool.decode(CLIP, 4, label="video 1")
    assert out.frames.shape == (4, 448, 448, 3) and out.indices == [2, 7, 12, 16]
    with pytest.raises(MediaError, match="^video 2: not a supported video container"):
        pool.decode(b"junk" * 100, 4, label="video 2")


@pytest.mark.parametrize("bad,reason", [
    (faulty_decoders.hang, "video 1: decoding took longer than 2 s"),
    (faulty_decoders.abort, r"video 1: the video decoder crashed on this file \(exit -6\)"),
    (faulty_decoders.hog, "video 1: decoding needed more than the 1024 MB memory limit"),
])
def test_a_misbehaving_decoder_fails_one_request_and_is_replaced(pool, bad, reason) -> None:
    before = pool.pids()
    pool.decoder = bad
    start = time.monotonic()
    try:
        with pytest.raises(MediaError, match=reason):
            pool.decode(CLIP, 4, label="video 1")
    finally:
        pool.decoder = frames.decode_video
    assert time.monotonic() - start < 6
    if bad is not faulty_decoders.hog:  # a MemoryError is caught: that worker lives on
        assert pool.pids() != before and pool.replaced >= 1
    assert all(pid != os.getpid() for pid in pool.pids())
    out = pool.decode(CLIP, 2, label="video 1")  # the next request is served
    assert np.asarray(out.frames).shape == (2, 448, 448, 3)


def test_the_input_that_hung_ffmpeg_under_the_fuzzer_is_contained(pool) -> None:
    data = (Path(__file__).parent / "data" / "mkv-native-hang-under-libfuzzer.mkv").read_bytes()
    start = time.monotonic()
    with pytest.raises(MediaError, match="^video 1: "):
        pool.decode(data, 4, label="video 1")
    assert time.monotonic() - start < 6  # decoded, rejected, or killed at the 2 s timeout
    assert pool.decode(CLIP, 2, label="video 1").frames.shape[0] == 2


def test_the_callers_deadline_bounds_the_wait_and_the_decode(pool) -> None:
    from service.engine.job import DeadlineExceeded

    pool.decoder = faulty_decoders.hang
    try:
        start = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="video 1: the deadline passed while decoding"):
            pool.decode(CLIP, 4, label="video 1", deadline=time.monotonic() + 0.3)
        assert time.monotonic() - start < 1.5
    finally:
        pool.decoder = frames.decode_video
    assert pool.decode(CLIP, 2, label="video 1").frames.shape[0] == 2

