"""Checks that need a CUDA device: `pytest -m gpu`, run by bench/gpu.sh on a GPU machine and
skipped elsewhere. With EAGLE_TEST_DEVICE=cpu the same code runs on the CPU (CUDA graphs
eagerly, no real out-of-memory), which checks the tests themselves on a machine without one."""
from __future__ import annotations

import gc
import os
import time

import factory
import grpc
import pytest
import torch
from eagle.v1 import chat_pb2, chat_pb2_grpc

from service.engine.job import (
    Cancelled,
    ChatJob,
    ChatMessage,
    Delta,
    Finished,
    ImagePart,
    OutOfMemory,
    Role,
    SamplingParams,
    TextPart,
    VideoPart,
    VisionParams,
)
from service.engine.llm import Decoder
from service.engine.loader import load_model
from service.engine.scheduler import EngineSettings, NativeEngine

DEVICE = os.environ.get("EAGLE_TEST_DEVICE", "cuda")
ON_CUDA = DEVICE.startswith("cuda")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    ON_CUDA and not torch.cuda.is_available(),
    reason="no CUDA device: the GPU checks run on a GPU machine through bench/gpu.sh")]
CLIP = factory.video(None, seconds=2, fps=10)


def job(rid: str, *parts, tokens: int = 24, tiles: int = 6) -> ChatJob:
    return ChatJob(rid, (ChatMessage(Role.USER, (*parts, TextPart("Describe it."))),),
                   SamplingParams(max_new_tokens=tokens, ignore_eos=True),
                   VisionParams(max_tiles_per_image=tiles))


def final(engine, j: ChatJob) -> Finished:
    events = list(engine.submit(j))
    assert isinstance(events[-1], Finished)
    return events[-1]


@pytest.fixture(scope="module")
def on_device(tiny_dir):
    """The tiny model on the device in bfloat16, as the server runs it there."""
    return load_model(tiny_dir, device=DEVICE, dtype="bfloat16")


def test_float32_greedy_tokens_on_cuda_equal_cpu(tiny, tiny_dir) -> None:
    """Same weights, same prompts (text, one image, two images, a video), float32 on both:
    the CUDA path computes what the CPU path computes, token for token."""
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 (the conv too)
    torch.backends.cudnn.allow_tf32 = False
    gpu = load_model(tiny_dir, device=DEVICE, dtype="float32")
    photo = factory.encode(factory.photo(1000, 700, seed=1), "JPEG")
    other = factory.encode(factory.photo(600, 900, seed=2), "PNG")
    jobs = [job("text"), job("image", ImagePart(data=photo)),
            job("two images", ImagePart(data=photo), ImagePart(data=other)),
            job("video", VideoPart(data=CLIP, num_frames=4))]
    engines = [NativeEngine(tiny, EngineSettings(batch_invariant=False)),
               NativeEngine(gpu, EngineSettings(batch_invariant=False))]
    try:
        for j in jobs:
            cpu, cuda = (final(e, j) for e in engines)
            assert cuda.text == cpu.text, j.request_id
            assert cuda.usage.completion_tokens == cpu.usage.completion_tokens == 24
            assert cuda.usage.prompt_tokens == cpu.usage.prompt_tokens
    finally:
        for e in engines:
            e.drain(0)


@pytest.mark.parametrize("batch", [1, 16])
def test_cuda_graph_decode_equals_eager_decode(on_device, batch) -> None:
    """bfloat16 decode of `batch` rows, 20 steps crossing the 256 -> 512 key-length bucket
    (a second graph is captured): replayed graphs give the logits of the
    same static step run eagerly, bit for bit, and the tokens of the dynamic eager path."""
    from service.engine.graphs import DecodeGraphs

    lm = on_device.model.language_model
    gen = torch.Generator().manual_seed(batch)
    lengths = [250 - (7 * r) % 40 for r in range(batch)]
    ids = torch.randint(0, 600, (batch, 256), generator=gen).to(on_device.device)
    eager, static, replay = Decoder(lm, 16), Decoder(lm, 16), Decoder(lm, 16)
    static.graphs = DecodeGraphs(static, 16, capture=False)
    replay.graphs = DecodeGraphs(replay, 16, capture=ON_CUDA)
    sequences = {name: [] for name in ("eager", "static", "replay")}
    tables = {}
    with torch.inference_mode():
        for dec in (eager, static, replay):
            tables[dec] = [dec.reserve(n + 20) for n in lengths]
            for row, n in enumerate(lengths):
                dec.prefill(lm.model.embed_tokens(ids[row, :n]), tables[dec][row])
        start = torch.stack([ids[r, n] for r, n in enumerate(lengths)])
        positions0 = torch.tensor(lengths, device=on_device.device)
        for name, dec in (("eager", eager), ("static", static), ("replay", replay)):
            tokens, positions = start, positions0
            for _ in range(20):
                if name == "eager":
                    logits = dec.decode_step(tokens, positions, tables[dec])
                else:
                    logits = dec.decode_step(tokens, positions, tables[dec],
                                             int(positions.max()))
                sequences[name].append(logits.float().cpu())
                tokens, positions = logits.argmax(-1), positions + 1
    for a, b in zip(sequences["static"], sequences["replay"]):
        assert torch.equal(a, b)
    tokens = {name: torch.stack([s.argmax(-1) for s in seq]) for name, seq in sequences.items()}
    assert torch.equal(tokens["replay"], tokens["eager"])
    if ON_CUDA:
        assert replay.graphs is not None and replay.graphs.captured >= 2  # 256 and 512 keys
        assert replay.graphs.replayed == 20


def test_sixteen_mixed_jobs_with_cancels_each_end_exactly_once(on_device) -> None:
    engine = NativeEngine(on_device, EngineSettings(max_running=16))
    photo = factory.encode(factory.photo(800, 600, seed=4), "JPEG")
    try:
        jobs = []
        for i in range(16):
            media = (ImagePart(data=photo),) if i % 4 == 1 else \
                (VideoPart(data=CLIP, num_frames=2 + i % 3),) if i % 4 == 2 else ()
            jobs.append(job(f"mix{i}", *media, tokens=16 + 4 * i, tiles=4))
        streams = {j.request_id: engine.submit(j) for j in jobs}
        cancel = {"mix3", "mix8", "mix13"}
        outcomes = {}
        for rid, stream in streams.items():
            terminal, events = [], iter(stream)
            try:
                for event in events:
                    if isinstance(event, Finished):
                        terminal.append(event)
                    elif isinstance(event, Delta) and rid in cancel:
                        stream.cancel()
            except Cancelled as exc:
                terminal.append(exc)
            assert len(terminal) == 1, (rid, terminal)
            outcomes[rid] = type(terminal[0]).__name__
        for rid in streams:  # a cancelled job may have finished before the cancel reached it
            expected = {"Cancelled", "Finished"} if rid in cancel else {"Finished"}
            assert outcomes[rid] in expected, (rid, outcomes[rid])
        deadline = time.monotonic() + 10
        while engine.stats()["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.stats()["in_flight"] == 0
    finally:
        engine.drain(0)


@pytest.mark.parametrize("batch", [1, 16])
def test_the_compiled_graph_decode_follows_the_eager_decode(on_device, batch) -> None:
    """--compile-decode: graphs captured from the torch.compile'd step (one compile for batch
    1, one for the rest), fed the eager path's tokens for 20 steps across the 256 -> 512
    bucket: bfloat16 logits within rounding of the eager step's (fusion changes the order
    of float operations, so not bit for bit), the same greedy token in nearly every row."""
    from service.engine.graphs import DecodeGraphs

    lm = on_device.model.language_model
    gen = torch.Generator().manual_seed(batch)
    lengths = [250 - (7 * r) % 40 for r in range(batch)]
    ids = torch.randint(0, 600, (batch, 256), generator=gen).to(on_device.device)
    eager, compiled = Decoder(lm, 16), Decoder(lm, 16)
    compiled.graphs = DecodeGraphs(compiled, 16, capture=ON_CUDA, compile=True)
    same = total = 0
    with torch.inference_mode():
        compiled.graphs.warm()
        assert compiled.graphs.compile_error == ""
        tables = {}
        for dec in (eager, compiled):
            tables[dec] = [dec.reserve(n + 20) for n in lengths]
            for row, n in enumerate(lengths):
                dec.prefill(lm.model.embed_tokens(ids[row, :n]), tables[dec][row])
        tokens = torch.stack([ids[r, n] for r, n in enumerate(lengths)])
        positions = torch.tensor(lengths, device=on_device.device)
        for _ in range(20):
            a = eager.decode_step(tokens, positions, tables[eager]).float()
            b = compiled.decode_step(tokens, positions, tables[compiled],
                                     int(positions.max())).float()
            assert (a - b).abs().max() <= 0.05 * a.abs().max() + 0.05, (a - b).abs().max()
            same += int((a.argmax(-1) == b.argmax(-1)).sum())
            total += batch
            tokens, positions = a.argmax(-1), positions + 1
    assert same >= 0.9 * total, f"{same} of {total} greedy tokens alike"
    if ON_CUDA:
        assert compiled.graphs.captured >= 2 and compiled.graphs.replayed == 20


@pytest.mark.skipif(not ON_CUDA, reason="a real out-of-memory needs CUDA's allocator cap")
def test_a_real_out_of_memory_fails_only_the_job_that_ran_out(on_device) -> None:
    """The process's CUDA memory is capped between what a short request needs and what a
    12k-token prompt needs: the long one gets OutOfMemory (RESOURCE_EXHAUSTED), a job
    running beside it finishes, and the next request succeeds."""
    long_text = TextPart(" ".join(f"word{i}" for i in range(1800)))  # ~12k tokens
    big = ChatJob("big", (ChatMessage(Role.USER, (long_text,)),),
                  SamplingParams(max_new_tokens=4))

    def warmed() -> NativeEngine:
        # as long as the job beside will run: its decode steps' graphs are captured before the
        # cap, so under it only the long prompt needs new memory
        engine = NativeEngine(on_device, EngineSettings(max_running=4))
        final(engine, job("warm", tokens=400))
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        return engine

    # What the long prompt needs, measured in an engine of its own that is then dropped: an
    # engine keeps what a long prompt made (its chunk mask, its decode graphs), so the third
    # H200 run's same-engine measure left the second long prompt nothing new to allocate.
    engine = warmed()
    base = torch.cuda.memory_reserved()
    torch.cuda.reset_peak_memory_stats()
    final(engine, big)  # what it needs, uncapped
    need = torch.cuda.max_memory_reserved() - base
    engine.drain(0)
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    assert need > 4 * 2**20, f"the long prompt needed only {need} bytes"
    engine = warmed()
    try:
        total = torch.cuda.get_device_properties(on_device.device).total_memory
        torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + need / 3)
                                                   / total, on_device.device)
        beside = engine.submit(job("beside", tokens=400))
        events = iter(beside)
        assert isinstance(next(events), Delta)  # running when the big one arrives
        with pytest.raises(OutOfMemory, match="ran out of memory for this request"):
            list(engine.submit(big))
        # the cap lifted once the long prompt has failed: the job beside it must not have been
        # failed with it, and under the cap its own next graph bucket may not fit (the second
        # H200 run: the lone row beside, its decode step out of memory after the prompt's)
        torch.cuda.set_per_process_memory_fraction(1.0, on_device.device)
        assert isinstance(list(events)[-1], Finished)
        assert final(engine, job("after", tokens=8)).usage.completion_tokens == 8
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, on_device.device)
        engine.drain(0)


def test_the_grpc_server_on_the_device_answers_health_chat_and_stream(on_device) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from client import EagleClient
    from service.server import BackgroundServer
    from service.settings import Settings

    engine = NativeEngine(on_device, EngineSettings())
    photo = factory.encode(factory.photo(900, 600, seed=5), "JPEG")
    try:
        with BackgroundServer(Settings(port=0, grace_seconds=2, log_format="text"),
                              engine) as srv:
            with grpc.insecure_channel(srv.target) as channel:
                health = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service="eagle.v1.ChatService"), timeout=10)
                assert health.status == health_pb2.HealthCheckResponse.SERVING
                info = chat_pb2_grpc.ChatServiceStub(channel).GetModelInfo(
                    chat_pb2.GetModelInfoRequest(), timeout=10)
                assert info.device == f"{on_device.device.type} bfloat16"
            with EagleClient(srv.target, timeout=60) as client:
                whole = client.chat("What is it?", images=[photo], max_new_tokens=12,
                                    ignore_eos=True)
                assert whole.usage.completion_tokens == 12 and whole.usage.image_tiles > 1
                stream = client.stream_chat("What is it?", images=[photo], max_new_tokens=12,
                                            ignore_eos=True)
                assert "".join(stream) == whole.text
                assert stream.result.finish_reason == "length"
    finally:
        engine.drain(0)


def test_jpeg_tiles_on_the_device_match_the_cpu_path(tiny) -> None:
    """nvJPEG decode + resize on the device against the CPU path (Pillow/libvips): the same
    grid and >= 30 dB on the worst tile, EXIF-rotated included; through the Preparer, a JPEG
    stays on the device while a PNG and a CMYK JPEG take the CPU path."""
    import numpy as np
    from PIL import Image

    from preprocess import device_tiles, tiler
    from preprocess.media import decode_image, open_image
    from service.engine.prepare import MediaSettings, Preparer
    from service.engine.processor_prompt import ProcessorPrompt

    device = torch.device(DEVICE)
    exif = Image.Exif()
    exif[0x0112] = 6
    photos = [factory.encode(factory.photo(4032, 3024, seed=1), "JPEG", quality=90),
              factory.encode(factory.photo(1275, 1650, seed=2), "JPEG", progressive=True),
              factory.encode(factory.photo(900, 500, seed=3), "JPEG", exif=exif.tobytes())]
    for data in photos:
        ours = device_tiles.jpeg_tiles(data, open_image(data).orientation, device=device,
                                       max_tiles=12)
        ref = tiler.split_tiles(decode_image(data), max_tiles=12, kernel="torch")
        assert ours.device.type == device.type and tuple(ours.shape) == ref.shape
        worst = min(10 * np.log10(255.0 ** 2 / max(np.mean(
            (a.astype(np.float64) - b.astype(np.float64)) ** 2), 1e-12))
            for a, b in zip(ours.cpu().numpy(), ref))
        assert worst >= 30.0, worst
    prep = Preparer(tiny.tokenizer, tiny.cfg, 16384, MediaSettings(), device=device,
                    style=ProcessorPrompt(tiny.tokenizer))  # the device path's kernel: torch's
    png = factory.encode(factory.document(500, 700), "PNG")
    cmyk = factory.encode(factory.photo(640, 480).convert("CMYK"), "JPEG")
    parts = (ImagePart(data=photos[0]), ImagePart(data=png), ImagePart(data=cmyk))
    out = prep(ChatJob("t", (ChatMessage(Role.USER, (*parts, TextPart("Describe."))),),
                       SamplingParams(max_new_tokens=4), VisionParams(max_tiles_per_image=6)))
    assert [isinstance(g.tiles, torch.Tensor) for g in out.groups] == [True, False, False]
    assert out.groups[0].tiles.device.type == device.type
    for g in out.groups:  # CPU tiles cross as uint8 and are normalised on the device
        pixels = g.pixel_values("siglip", device, torch.float32, 1, 4)
        assert pixels.device.type == device.type and pixels.shape == (3, 3, 448, 448)
        on_cpu = tiler.normalize(g.tiles[1:4].cpu() if isinstance(g.tiles, torch.Tensor)
                                 else g.tiles[1:4], "siglip")
        assert torch.allclose(pixels.cpu(), on_cpu, atol=1e-6)


def test_flex_attention_decode_on_the_device_equals_gathered_attention(tiny_dir) -> None:
    """`--attention flex` on the device (compiled on CUDA, its steps replayed from CUDA
    graphs): 16 rows of 40 to 300 positions, two sharing a prefix block, decode the
    gathered-SDPA decoder's greedy tokens in float32, logits within 1e-3."""
    from service.engine.graphs import DecodeGraphs

    lm = load_model(tiny_dir, device=DEVICE, dtype="float32").model.language_model
    dev = lm.device
    gen = torch.Generator().manual_seed(16)
    lengths = [300 - 17 * r for r in range(16)]
    ids = torch.randint(0, 600, (16, 300), generator=gen).to(dev)
    ids[1, :16] = ids[0, :16]
    runs = {}
    for attention in ("gather", "flex"):
        dec = Decoder(lm, 16, blocks=16 * 22, attention=attention)
        dec.graphs = DecodeGraphs(dec, 16, capture=ON_CUDA, max_keys=1024)
        shared = dec.reserve(16)
        tables = [shared + dec.reserve(n - 16 + 12) if r < 2 else dec.reserve(n + 12)
                  for r, n in enumerate(lengths)]
        embed = lm.model.embed_tokens
        with torch.inference_mode():
            dec.prefill(embed(ids[0, :16]), shared)
            for r, n in enumerate(lengths):
                first = 16 if r < 2 else 0
                if first:
                    dec.prefill_chunk(embed(ids[r, first:n]), tables[r], first)
                else:
                    dec.prefill(embed(ids[r, :n]), tables[r])
            tokens = torch.stack([ids[r, n - 1] for r, n in enumerate(lengths)])
            positions = torch.tensor(lengths, device=dev)
            steps = []
            for _ in range(12):
                logits = dec.decode_step(tokens, positions, tables, int(positions.max()))
                steps.append(logits.float().cpu())
                tokens, positions = logits.argmax(-1), positions + 1
        runs[attention] = torch.stack(steps)
        if ON_CUDA:
            assert dec.graphs is not None and dec.graphs.replayed == 12
    assert torch.equal(runs["flex"].argmax(-1), runs["gather"].argmax(-1))
    assert (runs["flex"] - runs["gather"]).abs().max().item() < 1e-3
