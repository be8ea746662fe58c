"""The engine's model equals an independent composition; the loader is strict about keys."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import factory
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

from service.engine.config import ModelLoadError, parse_config, read_config
from service.engine.job import ChatJob, ChatMessage, ImagePart, Role, TextPart, VisionParams
from service.engine.llm import Decoder
from service.engine.loader import build_empty, check_keys, load_model, official_names
from service.engine.prepare import MediaSettings, Preparer

_JUNK = {"architectures", "auto_map", "model_type", "torch_dtype", "_name_or_path"}


def _shuffle_like_upstream(x: torch.Tensor, scale: float = 0.5) -> torch.Tensor:
    """InternVL/Eagle pixel_shuffle ('v2'), restated with views and permutes."""
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale), int(c / scale)).permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    return x.permute(0, 2, 1, 3).contiguous()


def _independent(folder: Path):
    raw = json.loads((folder / "config.json").read_text())
    sd = load_file(str(folder / "model.safetensors"))
    vcfg = SiglipVisionConfig(**{k: v for k, v in raw["vision_config"].items() if k not in _JUNK})
    vision = SiglipVisionModel(vcfg).eval()
    prefix = "vision_model.vision_model."
    vision.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
    llm = Qwen2ForCausalLM(Qwen2Config(**{k: v for k, v in raw["llm_config"].items()
                                          if k not in _JUNK})).eval()
    missing = llm.load_state_dict({k[15:]: v for k, v in sd.items()
                                   if k.startswith("language_model.")}, strict=False).missing_keys
    assert missing == ["lm_head.weight"]  # tied: shares the input embeddings
    llm.tie_weights()
    c = vcfg.hidden_size * 4
    mlp = nn.Sequential(nn.LayerNorm(c), nn.Linear(c, llm.config.hidden_size), nn.GELU(),
                        nn.Linear(llm.config.hidden_size, llm.config.hidden_size)).eval()
    mlp.load_state_dict({k[5:]: v for k, v in sd.items() if k.startswith("mlp1.")})
    return vision, mlp, llm


def test_logits_equal_an_independent_composition_with_two_images(tiny, tiny_dir) -> None:
    job = ChatJob("eq", (ChatMessage(Role.USER, (
        ImagePart(data=factory.encode(factory.photo(900, 500, seed=1), "PNG")),
        TextPart("Compare"),
        ImagePart(data=factory.encode(factory.photo(300, 700, seed=2), "JPEG")),
        TextPart("these two.")),),), vision=VisionParams(max_tiles_per_image=2))
    prep = Preparer(tiny.tokenizer, tiny.cfg, 16384, MediaSettings())(job)
    assert prep.image_tiles == 3 + 3  # 2x1 + thumbnail, 1x2 + thumbnail
    pixels = torch.cat([g.pixel_values("siglip", torch.device("cpu"), torch.float32)
                        for g in prep.groups])
    ids = torch.tensor(prep.ids)
    ctx = tiny.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    with torch.inference_mode():
        feats = tiny.model.encode_tiles(pixels)
        dec = Decoder(tiny.model.language_model, 2)
        ours = dec.prefill(tiny.model.embed(ids, feats, ctx), dec.reserve(len(ids)),
                           all_logits=True)
        vision, mlp, llm = _independent(tiny_dir)
        v = vision(pixel_values=pixels).last_hidden_state  # (6, 1024, c)
        v = _shuffle_like_upstream(v.reshape(6, 32, 32, -1)).reshape(6, 256, -1)
        embeds = llm.get_input_embeddings()(ids).clone()
        embeds[ids == ctx] = mlp(v).reshape(-1, embeds.shape[-1])
        ref = llm(inputs_embeds=embeds[None]).logits[0]
    assert ours.shape == ref.shape == (len(prep.ids), llm.config.vocab_size)
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4), (ours - ref).abs().max()


def _official_keys(cfg: dict, text_key: str) -> dict[str, list[int]]:
    """The Eagle2 checkpoint key set (names and shapes) derived from the config, by hand."""
    v, t = cfg["vision_config"], cfg[text_key]
    hv, iv, p = v["hidden_size"], v["intermediate_size"], v["patch_size"]
    keys = {"vision_model.vision_model.embeddings.patch_embedding.weight": [hv, 3, p, p],
            "vision_model.vision_model.embeddings.patch_embedding.bias": [hv],
            "vision_model.vision_model.embeddings.position_embedding.weight":
                [(v["image_size"] // p) ** 2, hv],
            "vision_model.vision_model.post_layernorm.weight": [hv],
            "vision_model.vision_model.post_layernorm.bias": [hv]}
    for i in range(v["num_hidden_layers"]):
        b = f"vision_model.vision_model.encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            keys[b + f"self_attn.{proj}.weight"], keys[b + f"self_attn.{proj}.bias"] = [hv, hv], [hv]
        for norm in ("layer_norm1", "layer_norm2"):
            keys[b + f"{norm}.weight"], keys[b + f"{norm}.bias"] = [hv], [hv]
        keys[b + "mlp.fc1.weight"], keys[b + "mlp.fc1.bias"] = [iv, hv], [iv]
        keys[b + "mlp.fc2.weight"], keys[b + "mlp.fc2.bias"] = [hv, iv], [hv]
    h, it, vocab = t["hidden_size"], t["intermediate_size"], t["vocab_size"]
    kvd = h // t["num_attention_heads"] * t["num_key_value_heads"]
    keys.update({"mlp1.0.weight": [4 * hv], "mlp1.0.bias": [4 * hv], "mlp1.1.weight": [h, 4 * hv],
                 "mlp1.1.bias": [h], "mlp1.3.weight": [h, h], "mlp1.3.bias": [h],
                 "language_model.model.embed_tokens.weight": [vocab, h],
                 "language_model.model.norm.weight": [h]})
    for i in range(t["num_hidden_layers"]):
        b = f"language_model.model.layers.{i}."
        keys.update({b + "self_attn.q_proj.weight": [h, h], b + "self_attn.q_proj.bias": [h],
                     b + "self_attn.k_proj.weight": [kvd, h], b + "self_attn.k_proj.bias": [kvd],
                     b + "self_attn.v_proj.weight": [kvd, h], b + "self_attn.v_proj.bias": [kvd],
                     b + "self_attn.o_proj.weight": [h, h], b + "mlp.gate_proj.weight": [it, h],
                     b + "mlp.up_proj.weight": [it, h], b + "mlp.down_proj.weight": [h, it],
                     b + "input_layernorm.weight": [h], b + "post_attention_layernorm.weight": [h]})
    if not t.get("tie_word_embeddings"):
        keys["language_model.lm_head.weight"] = [vocab, h]
    return keys


@pytest.mark.parametrize("layout,text_key", [("eagle2-1b", "text_config"),
                                             ("eagle2-1b-legacy", "llm_config")])
def test_real_eagle2_1b_configs_build_the_official_key_set(shared_configs, layout, text_key):
    folder = shared_configs / layout
    cfg = read_config(folder)
    model = build_empty(cfg)
    assert all(p.is_meta for p in model.parameters())
    params = dict(model.named_parameters())
    ours = {official: list(params[name].shape) for name, official in official_names(model).items()}
    expected = _official_keys(json.loads((folder / "config.json").read_text()), text_key)
    assert len(expected) == 27 * 16 + 5 + 6 + 24 * 12 + 2
    assert ours == expected
    shapes = {k: tuple(v) for k, v in expected.items()}
    check_keys(model, shapes)  # the official set passes
    renamed = dict(shapes)
    renamed["language_model.model.layers.3.mlp.up_proj.weigth"] = renamed.pop(
        "language_model.model.layers.3.mlp.up_proj.weight")
    with pytest.raises(ModelLoadError, match=r"missing keys: language_model\.model\.layers\.3\.mlp"
                                             r"\.up_proj\.weight; unexpected keys: .*weigth"):
        check_keys(model, renamed)
    reshaped = dict(shapes)
    reshaped["mlp1.1.weight"] = (896, 4000)
    with pytest.raises(ModelLoadError, match=r"wrong shapes: mlp1\.1\.weight is \[896, 4000\], "
                                             r"expected \[896, 4608\]"):
        check_keys(model, reshaped)
    unused_head = dict(shapes, **{"vision_model.vision_model.head.probe": (1, 1, 1152)})
    check_keys(model, unused_head)  # the unused SigLIP pooling head is tolerated


def test_a_damaged_checkpoint_fails_naming_the_key(tiny_dir, tmp_path) -> None:
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tiny_dir / name).read_bytes())
    sd = load_file(str(tiny_dir / "model.safetensors"))
    sd["mlp1.3.bias_renamed"] = sd.pop("mlp1.3.bias")
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"missing keys: mlp1\.3\.bias; "
                                             r"unexpected keys: mlp1\.3\.bias_renamed"):
        load_model(tmp_path, device="cpu")


def test_unsupported_layouts_are_refused_clearly() -> None:
    with pytest.raises(ModelLoadError, match="vision_config.model_type 'clip_vision_model' is "
                                             "not supported; expected 'siglip_vision_model' "
                                             "or 'MOB'"):
        parse_config({"model_type": "eagle_chat", "llm_config": {},
                      "vision_config": {"model_type": "clip_vision_model"}})
    with pytest.raises(ModelLoadError, match="model_type 'llava' is not an Eagle2 layout"):
        parse_config({"model_type": "llava"})


def test_tiny_is_written_deterministically(tiny_dir, tmp_path) -> None:
    from service.engine.tiny import ensure_tiny

    again = ensure_tiny(tmp_path)
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        digest = [hashlib.sha256((d / name).read_bytes()).hexdigest() for d in (tiny_dir, again)]
        assert digest[0] == digest[1], name
    cfg = read_config(again)
    assert cfg.model_type == "eagle_chat" and cfg.patch_tokens == 256 and cfg.image_size == 448


@pytest.mark.parametrize("invariant", [False, True])
def test_batched_decode_matches_transformers_for_rows_of_different_lengths(tiny, invariant):
    lm = tiny.model.language_model
    ids = torch.randint(0, 600, (60,), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = lm(input_ids=ids[None]).logits[0]
        dec = Decoder(lm, 4, batch_invariant=invariant)
        lengths = [50, 12, 31]
        tables = [dec.reserve(n + 1) for n in lengths]
        for table, n in zip(tables, lengths):
            dec.prefill(lm.model.embed_tokens(ids[:n]), table)
        out = dec.decode_step(ids[lengths], torch.tensor(lengths), tables)
    for row, n in enumerate(lengths):
        assert torch.allclose(out[row], ref[n], atol=1e-4), (row, (out[row] - ref[n]).abs().max())


@pytest.mark.parametrize("length,bucket", [(1, 64), (64, 64), (65, 128), (200, 256),
                                           (1000, 1024), (1850, 1920), (4097, 4608)])
def test_key_buckets_depend_on_the_row_alone_and_waste_under_an_eighth(length, bucket) -> None:
    from service.engine.llm import key_bucket

    assert key_bucket(length) == bucket
    assert bucket - length < max(64, length / 8)


def test_fused_projections_are_views_and_leave_the_weights_as_loaded(tiny_dir) -> None:
    model = load_model(tiny_dir, device="cpu").model.language_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dec = Decoder(model, 2)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    attn = model.model.layers[1].self_attn
    fused, _ = dec._qkv[1]
    assert attn.k_proj.weight.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    assert fused.shape[0] == attn.q_proj.out_features + 2 * attn.k_proj.out_features


def test_static_decode_steps_for_cuda_graphs_match_the_dynamic_path(tiny) -> None:
    """What a GPU replays from CUDA graphs, run eagerly here: padded batch buckets, key
    lengths by power of two (crossing 256 mid-way), padded block tables."""
    from service.engine.graphs import DecodeGraphs

    lm = tiny.model.language_model
    ids = torch.randint(0, 600, (400,), generator=torch.Generator().manual_seed(1))
    lengths = [250, 12, 31, 254, 90]
    eager, static = Decoder(lm, 16), Decoder(lm, 16)
    static.graphs = DecodeGraphs(static, 16, capture=False)
    assert static.graphs.shapes(5, 253) == (8, 256)
    assert static.graphs.shapes(5, 256) == (8, 512)
    assert static.graphs.shapes(1, 10) == (1, 256)
    assert static.graphs.shapes(13, 10) == (16, 256)
    with torch.inference_mode():
        tables = {}
        for dec in (eager, static):
            tables[dec] = [dec.reserve(n + 6) for n in lengths]
            for table, n in zip(tables[dec], lengths):
                dec.prefill(lm.model.embed_tokens(ids[:n]), table)
        tokens = ids[lengths]
        positions = torch.tensor(lengths)
        for _ in range(6):  # rows 0 and 3 cross from 256 to 512 keys
            a = eager.decode_step(tokens, positions, tables[eager])
            b = static.decode_step(tokens, positions, tables[static], int(positions.max()))
            assert b.shape == a.shape == (5, lm.config.vocab_size)
            assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
            tokens, positions = a.argmax(-1), positions + 1
        assert static.pool.counts().used == sum(-(-(n + 6) // 16) for n in lengths)


def test_the_compiled_decode_step_computes_the_eager_step_and_writes_the_same_keys(tiny) -> None:
    """What a GPU captures with --compile-decode (torch.compile's step), run here by Inductor
    on the CPU: compiled once for batch 1 and once for larger batches by warm(), then every
    bucket (batch 8, 256 then 512 keys, the widest) without another compile, logits as the eager path's
    and the keys and values it wrote in the pool equal to the eager path's."""
    import torch._dynamo

    from service.engine.graphs import DecodeGraphs

    torch._dynamo.reset()
    lm = tiny.model.language_model
    ids = torch.randint(0, 600, (400,), generator=torch.Generator().manual_seed(2))
    lengths = [250, 12, 254, 90, 3]
    eager, compiled = Decoder(lm, 8), Decoder(lm, 8)
    # sized for 512 keys: the rows crossing 256 reach the widest bucket, whose table view
    # once became contiguous and recompiled the step (the sixth H200 run)
    compiled.graphs = DecodeGraphs(compiled, 8, capture=False, compile=True, max_keys=512)
    with torch.inference_mode():
        assert compiled.graphs.warm() > 0
        assert compiled.graphs.compile_error == ""
        frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        tables = {}
        for dec in (eager, compiled):
            tables[dec] = [dec.reserve(n + 6) for n in lengths]
            for table, n in zip(tables[dec], lengths):
                dec.prefill(lm.model.embed_tokens(ids[:n]), table)
        tokens, positions = ids[lengths], torch.tensor(lengths)
        for _ in range(6):  # rows 0 and 2 cross from 256 to 512 keys
            a = eager.decode_step(tokens, positions, tables[eager])
            b = compiled.decode_step(tokens, positions, tables[compiled], int(positions.max()))
            assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
            assert torch.equal(a.argmax(-1), b.argmax(-1))
            tokens, positions = a.argmax(-1), positions + 1
        one = compiled.decode_step(tokens[:1], positions[:1], tables[compiled][:1],
                                   int(positions[0]))
        assert one.shape == (1, lm.config.vocab_size)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames  # no recompile
        for layer in range(len(eager.layers)):
            for row in range(len(lengths)):
                for store in ("k", "v"):
                    mine = getattr(eager.pool, store)[layer][:, tables[eager][row]]
                    theirs = getattr(compiled.pool, store)[layer][:, tables[compiled][row]]
                    assert torch.allclose(mine, theirs, atol=1e-5), (layer, row, store)


def test_a_decode_step_that_fails_to_compile_runs_uncompiled(tiny, monkeypatch, caplog) -> None:
    """An Inductor failure (a torch build without a compiler, an op it cannot lower) is
    logged once, recorded, and the step runs eagerly with the same results."""
    from service.engine.graphs import DecodeGraphs

    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("InductorError: no C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    lm = tiny.model.language_model
    dec = Decoder(lm, 2)
    dec.graphs = DecodeGraphs(dec, 2, capture=False, compile=True)
    with torch.inference_mode():
        dec.graphs.warm()
        assert dec.graphs.compile_error == "RuntimeError: InductorError: no C++ compiler"
        table = dec.reserve(20)
        dec.prefill(lm.model.embed_tokens(torch.arange(10)), table)
        logits = dec.decode_step(torch.tensor([3]), torch.tensor([10]), [table], 10)
    assert logits.shape == (1, lm.config.vocab_size)
    assert caplog.text.count("compiling the decode step failed") == 1


def test_once_warm_a_step_that_would_compile_again_runs_uncompiled(tiny, caplog) -> None:
    """After warm(), a step the guards did not foresee (here a contiguous block table, the
    layout that once recompiled the step for a minute mid-serving) is not compiled: it runs
    uncompiled, with the uncompiled step's result, and is counted and logged once."""
    import torch._dynamo

    from service.engine.graphs import DecodeGraphs

    torch._dynamo.reset()
    lm = tiny.model.language_model
    dec = Decoder(lm, 4)
    dec.graphs = DecodeGraphs(dec, 4, capture=False, compile=True, max_keys=512)
    with torch.inference_mode():
        dec.graphs.warm()
        assert dec.graphs.compile_error == "" and dec.graphs.warmed
        frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        table = dec.reserve(40)
        dec.prefill(lm.model.embed_tokens(torch.arange(30)), table)
        tokens, positions = torch.tensor([3, 3]), torch.tensor([30, 30])
        blocks = dec._padded([table, table], 16).contiguous()  # not a view of the buffer
        for _ in range(2):
            out = dec.graphs._step(tokens, positions, blocks)
        expected = dec.static_body(tokens, positions, blocks)
    assert torch.equal(out, expected)
    assert dec.graphs.uncompiled_steps == 2
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames
    assert caplog.text.count("would have compiled again while serving") == 1
