"""CPU proxies for the CUDA path: the whole request path in bfloat16 (what a GPU runs), so a
dtype mismatch that would break CUDA breaks here; --dtype and --device parsing."""
from __future__ import annotations

import json

import factory
import pytest
import torch
from harness import RunningServer

from client import EagleClient, Video
from service.engine.job import ChatJob, ChatMessage, Finished, Role, SamplingParams, TextPart
from service.engine.llm import Decoder
from service.engine.loader import load_model, pick_device
from service.engine.scheduler import EngineSettings, NativeEngine
from service.settings import Settings, load

PHOTO = factory.encode(factory.photo(1200, 700, seed=3), "JPEG")
CLIP = factory.video(None, seconds=2, fps=10)


@pytest.fixture(scope="module")
def tiny_bf16(tiny_dir):
    return load_model(tiny_dir, device="cpu", dtype="bfloat16")


def test_the_whole_path_runs_in_bfloat16_through_the_engine_process(tiny_dir) -> None:
    """Server, engine process, tiling, vision tower, prefill, batched decode, streaming,
    a response format and logprobs, all with bfloat16 weights, activations and KV."""
    from service.engine_process import EngineProcess

    engine = EngineProcess(Settings(cache_dir=str(tiny_dir.parent), video_workers=0,
                                    dtype="bfloat16", log_level="WARNING"))
    try:
        with RunningServer(engine) as srv, EagleClient(srv.target, timeout=60) as client:
            assert client.model_info().device == "cpu bfloat16"
            args = dict(images=[PHOTO], videos=[Video(data=CLIP, num_frames=4)],
                        max_new_tokens=12, ignore_eos=True)
            whole = client.chat("Describe both.", **args)
            assert whole.usage.image_tiles == 7 and whole.usage.video_frames == 4
            assert whole.usage.completion_tokens == 12
            stream = client.stream_chat("Describe both.", **args)
            assert "".join(stream) == whole.text
            schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
                                                             "maximum": 9}},
                      "required": ["n"], "additionalProperties": False}
            shaped = client.chat("JSON.", json_schema=schema, top_logprobs=3)
            assert 0 <= json.loads(shaped.text)["n"] <= 9
            assert all(t.logprob <= 0 for t in shaped.logprobs)
    finally:
        engine.drain(0)


def test_bfloat16_jobs_give_the_same_tokens_batched_as_alone(tiny_bf16) -> None:
    engine = NativeEngine(tiny_bf16, EngineSettings(max_running=8))
    try:
        jobs = [ChatJob(f"bf{i}", (ChatMessage(Role.USER, (TextPart(
            " ".join(f"w{j}" for j in range(3 + 9 * i))),)),), SamplingParams(
            max_new_tokens=10 + i, ignore_eos=True)) for i in range(6)]
        alone = {j.request_id: list(engine.submit(j))[-1] for j in jobs}
        streams = {j.request_id: engine.submit(j) for j in jobs}
        for rid, stream in streams.items():
            together = list(stream)[-1]
            assert isinstance(together, Finished) and together.text == alone[rid].text, rid
    finally:
        engine.drain(0)


def test_static_decode_steps_match_the_dynamic_path_in_bfloat16(tiny_bf16) -> None:
    """The steps a GPU captures as CUDA graphs, eagerly, in the dtype the GPU runs."""
    from service.engine.graphs import DecodeGraphs

    lm = tiny_bf16.model.language_model
    ids = torch.randint(0, 600, (300,), generator=torch.Generator().manual_seed(2))
    lengths = [251, 9, 40]
    eager, static = Decoder(lm, 8), Decoder(lm, 8)
    static.graphs = DecodeGraphs(static, 8, capture=False)
    assert static.pool.k[0].dtype == torch.bfloat16
    with torch.inference_mode():
        tables = {}
        for dec in (eager, static):
            tables[dec] = [dec.reserve(n + 8) for n in lengths]
            for table, n in zip(tables[dec], lengths):
                dec.prefill(lm.model.embed_tokens(ids[:n]), table)
        tokens, positions = ids[lengths], torch.tensor(lengths)
        for _ in range(8):  # row 0 crosses 256 keys: the next shape
            a = eager.decode_step(tokens, positions, tables[eager])
            b = static.decode_step(tokens, positions, tables[static], int(positions.max()))
            assert a.dtype == b.dtype == torch.bfloat16
            assert torch.equal(a.argmax(-1), b.argmax(-1))
            assert (a.float() - b.float()).abs().max() < 0.1
            tokens, positions = a.argmax(-1), positions + 1


def test_dtype_and_device_settings() -> None:
    assert load(["--dtype", "bfloat16"], env={}).dtype == "bfloat16"
    assert load([], env={"EAGLE_DTYPE": "float16"}).dtype == "float16"
    with pytest.raises(ValueError, match="--dtype 'int8': use auto, bfloat16, float16 or "
                                         "float32"):
        load(["--dtype", "int8"], env={})
    assert pick_device("cpu") == (torch.device("cpu"), torch.float32)
    assert pick_device("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)
    from service.engine.job import ModelLoadError

    with pytest.raises(ModelLoadError, match="only cpu and cuda are served"):
        pick_device("meta")
    with pytest.raises(ModelLoadError, match="is not a device"):
        pick_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="--device cuda:1 was asked for but no CUDA "
                                                 "device is visible"):
            pick_device("cuda:1")
