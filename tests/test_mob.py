"""Eagle2-9B's two towers (MOB): the tiny MOB model equals an independent composition of
timm's ConvNeXt, transformers' SigLIP, the concat and mlp1; the 9B-shaped key set; damaged
configs; the memory check at load."""
from __future__ import annotations

import json
from pathlib import Path

import factory
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from test_engine_model import _JUNK, _shuffle_like_upstream
from timm.models.convnext import ConvNeXt
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

from service.engine.config import ModelLoadError, parse_config
from service.engine.job import ChatJob, ChatMessage, ImagePart, Role, TextPart, VisionParams
from service.engine.llm import Decoder
from service.engine.loader import build_empty, check_keys, load_model, official_names
from service.engine.prepare import MediaSettings, Preparer
from service.engine.tiny import ensure_tiny, mob_vision_config, tiny_config

TOWER = "vision_model.vision_model.vision_towers.{}.vision_tower."
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# the hub tower's slip_to_clip: x * a + b per channel, a and b float32 tensors
SLIP_A = torch.tensor([0.5 / s for s in CLIP_STD]).view(1, 3, 1, 1)
SLIP_B = torch.tensor([(0.5 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)]).view(1, 3, 1, 1)


def upstream_convnext_input(pixels: torch.Tensor) -> torch.Tensor:
    """The hub's order: bilinear resize in float32 rounded to the tiles' dtype, slip_to_clip in
    float32 rounded again, then the tower's bfloat16."""
    x = F.interpolate(pixels.float(), size=(512, 512), mode="bilinear",
                      align_corners=True).to(pixels.dtype)
    x = (x.to(torch.float32) * SLIP_A + SLIP_B).to(pixels.dtype)
    return x.to(torch.bfloat16)


@pytest.fixture(scope="module")
def mob_dir(tmp_path_factory) -> Path:
    return ensure_tiny(tmp_path_factory.mktemp("mob-cache"), "tiny-mob")


@pytest.fixture(scope="module")
def mob(mob_dir):
    return load_model(mob_dir, device="cpu")


def _independent(folder: Path):
    """SigLIP, ConvNeXt, mlp1 and Qwen2 built from the checkpoint by this test alone."""
    raw = json.loads((folder / "config.json").read_text())
    sd = load_file(str(folder / "model.safetensors"))
    vision = raw["vision_config"]
    scfg = SiglipVisionConfig(**{k: v for k, v in vision["siglip_vision_config"].items()
                                 if k not in _JUNK})
    siglip = SiglipVisionModel(scfg).eval()
    prefix = TOWER.format(0) + "vision_model."
    siglip.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
    convnext = ConvNeXt(depths=vision["convnext_depths"], dims=vision["convnext_dims"],
                        norm_eps=1e-5).eval()  # cast to bfloat16 below, as the hub's tower is
    prefix = TOWER.format(1)
    own = {}
    for k, v in sd.items():
        if k.startswith(prefix) and ".head." not in "." + k[len(prefix):]:
            name = k[len(prefix):]
            parts = name.split(".")
            if len(parts) == 5 and parts[2] == "blocks" and parts[4] == "weight":
                name = ".".join(parts[:4] + ["gamma"])  # the 9B code's name for timm's gamma
            own[name] = v
    missing = convnext.load_state_dict(own, strict=False).missing_keys
    assert all(m.startswith("head.") for m in missing)  # the classifier head, unused
    convnext.to(torch.bfloat16)
    llm = Qwen2ForCausalLM(Qwen2Config(**{k: v for k, v in raw["llm_config"].items()
                                          if k not in _JUNK})).eval()
    llm.load_state_dict({k[15:]: v for k, v in sd.items() if k.startswith("language_model.")},
                        strict=False)
    llm.tie_weights()
    c = scfg.hidden_size * 4 + vision["convnext_dims"][-1]
    mlp = nn.Sequential(nn.LayerNorm(c), nn.Linear(c, llm.config.hidden_size), nn.GELU(),
                        nn.Linear(llm.config.hidden_size, llm.config.hidden_size)).eval()
    mlp.load_state_dict({k[5:]: v for k, v in sd.items() if k.startswith("mlp1.")})
    return siglip, convnext, mlp, llm


def test_tiny_mob_logits_equal_an_independent_composition(mob, mob_dir) -> None:
    job = ChatJob("mob", (ChatMessage(Role.USER, (
        ImagePart(data=factory.encode(factory.photo(900, 500, seed=1), "PNG")),
        TextPart("What is this?"))),), vision=VisionParams(max_tiles_per_image=2))
    prep = Preparer(mob.tokenizer, mob.cfg, 16384, MediaSettings())(job)
    assert prep.image_tiles == 3
    pixels = torch.cat([g.pixel_values("siglip", torch.device("cpu"), torch.float32)
                        for g in prep.groups])
    ids = torch.tensor(prep.ids)
    ctx = mob.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    with torch.inference_mode():
        feats = mob.model.encode_tiles(pixels)
        dec = Decoder(mob.model.language_model, 2)
        ours = dec.prefill(mob.model.embed(ids, feats, ctx), dec.reserve(len(ids)),
                           all_logits=True)
        siglip, convnext, mlp, llm = _independent(mob_dir)
        s = siglip(pixel_values=pixels).last_hidden_state  # (3, 1024, 64)
        s = _shuffle_like_upstream(s.reshape(3, 32, 32, -1)).reshape(3, 256, -1)
        x = upstream_convnext_input(pixels)
        c = convnext.forward_features(x).flatten(2).transpose(1, 2)  # (3, 256, 48) bf16
        embeds = llm.get_input_embeddings()(ids).clone()
        embeds[ids == ctx] = mlp(torch.cat([s, c.float()], -1)).reshape(-1, embeds.shape[-1])
        ref = llm(inputs_embeds=embeds[None]).logits[0]
    assert ours.shape == ref.shape
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4), (ours - ref).abs().max()


def nine_b_config(vision_path: str = "MOB:palisiglip;convnext-1024") -> dict:
    """An Eagle2-9B-shaped config: SigLIP-so400m/14 at 448, convnext_xxlarge, Qwen2.5-7B."""
    raw = tiny_config(152064)
    raw["llm_config"].update(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                             num_attention_heads=28, num_key_value_heads=4,
                             tie_word_embeddings=False)
    raw["tie_word_embeddings"] = False
    siglip = dict(raw["vision_config"], hidden_size=1152, intermediate_size=4304,
                  num_hidden_layers=27, num_attention_heads=16)
    vision = mob_vision_config(siglip)
    del vision["convnext_depths"], vision["convnext_dims"]  # the 9B's: timm's xxlarge
    vision["vision_path"] = vision_path
    raw["vision_config"] = vision
    return raw


def _convnext_keys(prefix: str, scale: str) -> dict[str, tuple[int, ...]]:
    """timm's convnext_xxlarge parameters under the 9B's names, derived by hand."""
    depths, dims = (3, 4, 30, 3), (384, 768, 1536, 3072)
    keys = {prefix + "stem.0.weight": (384, 3, 4, 4), prefix + "stem.0.bias": (384,),
            prefix + "stem.1.weight": (384,), prefix + "stem.1.bias": (384,)}
    for s, (depth, dim) in enumerate(zip(depths, dims)):
        st = f"{prefix}stages.{s}."
        if s:
            keys.update({st + "downsample.0.weight": (dims[s - 1],),
                         st + "downsample.0.bias": (dims[s - 1],),
                         st + "downsample.1.weight": (dim, dims[s - 1], 2, 2),
                         st + "downsample.1.bias": (dim,)})
        for b in range(depth):
            bl = f"{st}blocks.{b}."
            keys.update({bl + scale: (dim,), bl + "conv_dw.weight": (dim, 1, 7, 7),
                         bl + "conv_dw.bias": (dim,), bl + "norm.weight": (dim,),
                         bl + "norm.bias": (dim,), bl + "mlp.fc1.weight": (4 * dim, dim),
                         bl + "mlp.fc1.bias": (4 * dim,), bl + "mlp.fc2.weight": (dim, 4 * dim),
                         bl + "mlp.fc2.bias": (dim,)})
    return keys


@pytest.mark.parametrize("siglip_at,scale", [(0, "gamma"), (0, "weight"), (1, "weight")])
def test_a_9b_shaped_checkpoint_has_the_official_key_set(siglip_at, scale, caplog) -> None:
    model = build_empty(parse_config(nine_b_config()))  # vision_path: SigLIP first
    assert all(p.is_meta for p in model.parameters())
    assert model.cfg.projector_in == 7680
    convnext_params = sum(p.numel() for n, p in model.named_parameters()
                          if n.startswith("vision_model.convnext."))
    assert convnext_params == 846_471_016 - 3072 * 1000 - 1000 - 2 * 3072  # less the head
    ours = {k: v for k, v in official_names(model).items()}
    params = dict(model.named_parameters())
    shapes = {official: tuple(params[name].shape) for name, official in ours.items()}
    convnext = {k: v for k, v in shapes.items() if ".vision_tower.stem." in k
                or ".vision_tower.stages." in k}
    assert convnext == _convnext_keys(TOWER.format(1), "gamma")
    siglip = {k for k in shapes if k.startswith(TOWER.format(0) + "vision_model.")}
    assert len(siglip) == 27 * 16 + 5  # the SigLIP tower, under vision_model.
    assert shapes["mlp1.0.weight"] == (7680,) and shapes["mlp1.1.weight"] == (3584, 7680)
    # the checkpoint as published: towers in either order, layer scale gamma or weight,
    # heads present; the keys decide when vision_path disagrees
    ckpt = {k: v for k, v in shapes.items() if ".vision_tower." not in k}
    ckpt.update({k.replace(TOWER.format(0), TOWER.format(siglip_at)): v
                 for k, v in shapes.items() if k.startswith(TOWER.format(0))})
    ckpt.update(_convnext_keys(TOWER.format(1 - siglip_at), scale))
    ckpt[TOWER.format(1 - siglip_at) + "head.fc.weight"] = (1000, 3072)
    ckpt[TOWER.format(siglip_at) + "vision_model.head.probe"] = (1, 1, 1152)
    with caplog.at_level("WARNING"):
        to_module = check_keys(model, ckpt)
    assert len(to_module) == len(shapes)
    if siglip_at == 1:
        assert "following the keys" in caplog.text
    broken = dict(ckpt)
    del broken[TOWER.format(1 - siglip_at) + f"stages.2.blocks.17.{scale}"]
    with pytest.raises(ModelLoadError, match=rf"missing keys: .*stages\.2\.blocks\.17\."
                                             rf"{scale}"):
        check_keys(model, broken)


@pytest.mark.parametrize("change,message", [
    (lambda v, r: v.update(vision_path="MOB:palisiglip;resnet-50"),
     "vision_config.vision_path 'MOB:palisiglip;resnet-50': expected one SigLIP tower "
     "(palisiglip) and one ConvNeXt tower (convnext-1024); unknown: resnet-50"),
    (lambda v, r: v.update(vision_path="palisiglip;convnext-1024"),
     "vision_config.vision_path 'palisiglip;convnext-1024' is not 'MOB:<tower>;<tower>'"),
    (lambda v, r: v.pop("siglip_vision_config"),
     "vision_config.siglip_vision_config is missing: the SigLIP tower's settings"),
    (lambda v, r: r.update(select_layer=-4),
     "select_layer is -4; the MOB towers use their last layer (-1)"),
    (lambda v, r: v.update(moe_version_type="convnext_1024_siglip_448"),
     "vision_config.moe_version_type 'convnext_1024_siglip_448': only "
     "'convnext_512_siglip_448' is served"),
    (lambda v, r: v.update(hidden_size=4096),
     "vision_config.hidden_size 4096 does not match the towers (4608 + 3072)"),
])
def test_a_damaged_mob_config_is_refused_naming_the_key(change, message) -> None:
    raw = nine_b_config()
    change(raw["vision_config"], raw)
    with pytest.raises(ModelLoadError) as info:
        parse_config(raw, source="config.json")
    assert str(info.value) == f"config.json: {message}"


def test_a_model_that_cannot_fit_is_refused_before_allocating(tmp_path, monkeypatch) -> None:
    from service.engine import loader

    (tmp_path / "config.json").write_text(json.dumps(nine_b_config()))
    save_file({}, str(tmp_path / "model.safetensors"))  # never read: refused before the weights
    monkeypatch.setattr(loader, "available_memory", lambda device: 24 * 2**30)
    with pytest.raises(ModelLoadError) as info:
        load_model(tmp_path, device="cpu", dtype="float32")
    assert str(info.value) == (
        "the model needs 31.6 GiB for its 8.91B parameters in float32, and cpu has 24.0 GiB "
        "available; use a smaller dtype (--dtype bfloat16) or a device with more memory")
    monkeypatch.setattr(loader, "available_memory", lambda device: 24 * 2**30)
    with pytest.raises(ModelLoadError, match="missing keys"):  # bf16 fits: on to the keys
        load_model(tmp_path, device="cpu", dtype="bfloat16")


def test_tiny_mob_serves_a_request_and_caches_both_towers(mob) -> None:
    from conftest import make_engine

    engine = make_engine(mob)
    image = factory.encode(factory.photo(700, 500, seed=9), "JPEG")
    job = lambda rid: ChatJob(rid, (ChatMessage(Role.USER, (  # noqa: E731
        ImagePart(data=image), TextPart("Describe."))),), vision=VisionParams(max_tiles_per_image=4))
    try:
        first = list(engine.submit(job("a")))[-1]
        again = list(engine.submit(job("b")))[-1]
        assert first.usage.image_tiles == again.usage.cached_tiles > 1
        assert again.text == first.text
    finally:
        engine.drain(0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_convnext_tower_runs_in_bfloat16_with_upstreams_rounding(mob_dir, dtype) -> None:
    loaded = load_model(mob_dir, device="cpu", dtype=dtype)
    vision = loaded.model.vision_model
    assert {p.dtype for p in vision.convnext.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in vision.siglip.parameters()} == {loaded.dtype}
    seen = []
    forward = vision.convnext.forward_features
    vision.convnext.forward_features = lambda x: forward(seen.append(x) or x)
    pixels = (torch.rand(2, 3, 448, 448, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    pixels = pixels.to(loaded.dtype)
    with torch.inference_mode():
        loaded.model.encode_tiles(pixels)
    assert seen[0].dtype == torch.bfloat16
    assert torch.equal(seen[0], upstream_convnext_input(pixels))
    if dtype == "bfloat16":  # the order shows: renormalising before the rounding moves values
        once = F.interpolate(pixels.float(), size=(512, 512), mode="bilinear",
                             align_corners=True)
        once = (once * SLIP_A + SLIP_B).to(torch.bfloat16)
        assert (once != seen[0]).float().mean() > 0.05
