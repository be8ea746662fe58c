"""The embedded tiny models: Eagle's exact architectures and file layouts, random weights.

`tiny` is Eagle2 in the legacy `eagle_chat` layout; `tiny-mob` the same with Eagle2-9B's
SigLIP + ConvNeXt towers (a small ConvNeXt of the same module structure); `tiny-2.5` the
`eagle_2_5_vl` layout with its processor's chat template and config (so it gets Eagle2.5's
prompt and frame sampler), SigLIP `head.*` tensors and more embedding rows than its
tokenizer has, as real checkpoints may. Written deterministically on first use (fixed seed,
tokenizer trained on a built-in text), then loaded through the same loader as a real
checkpoint. They answer with nonsense; they exist so that every path runs anywhere without a
download.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

log = logging.getLogger(__name__)

VERSION = "tiny-v1"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>",
                  "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
CONTEXT_LENGTH = 16384

_TEXT = """\
You are a helpful assistant. Describe this image in detail. What is in this picture?
This is a video. Frame one sampled at zero seconds. The image shows a cat sitting on a
wooden table beside a window, with morning light falling across a blue cup of coffee.
A red car drives along a mountain road under a cloudy sky; trees line both sides.
The document contains a table of numbers: revenue, costs and profit for each quarter.
Answer the question about the chart: which bar is the tallest, and by how much?
Two people are walking a dog in the park. Children play football on the green grass.
The screenshot shows a settings page with a list of options and a blue save button.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 3.14 42. Punctuation: , . ; : ! ? ( ) " '
Unicode: café naïve déjà vu — “quotes” ‘single’ 東京 北京 서울 Москва 😀 🚀 ✓ é ü ß ñ
""" * 4


def cache_root() -> Path:
    return Path(os.environ.get("EAGLE_CACHE_DIR", Path.home() / ".cache" / "eagle-grpc"))


def ensure_tiny(cache_dir: Path | None = None, variant: str = "tiny") -> Path:
    """A tiny checkpoint folder (`variant` in VARIANTS), written on first use (atomically:
    build, then rename)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown tiny model {variant!r}; one of {', '.join(VARIANTS)}")
    folder = (cache_dir or cache_root()) / VERSION.replace("tiny", variant, 1)
    if (folder / "model.safetensors").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=folder.parent))
    try:
        VARIANTS[variant](tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process won the race; theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote the %s random-weight model to %s", variant, folder)
    return folder


def train_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with Eagle's special tokens, trained on the built-in text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_TEXT.splitlines(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:], model_max_length=CONTEXT_LENGTH,
        clean_up_tokenization_spaces=False)


def tiny_config(vocab_size: int) -> dict:
    """config.json in the legacy `eagle_chat` layout, at toy sizes."""
    return {
        "architectures": ["Eagle2ChatModel"],
        "model_type": "eagle_chat",
        "downsample_ratio": 0.5,
        "dynamic_image_size": True,
        "force_image_size": 448,
        "max_dynamic_patch": 12,
        "min_dynamic_patch": 1,
        "select_layer": -1,
        "template": "qwen2-chat",
        "use_thumbnail": True,
        "ps_version": "v2",
        "tie_word_embeddings": True,
        "llm_config": {
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu",
            "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
            "vocab_size": vocab_size, "tie_word_embeddings": True, "bos_token_id": 0,
            "eos_token_id": 2, "use_sliding_window": False, "sliding_window": 32768,
            "attention_dropout": 0.0, "torch_dtype": "float32",
        },
        "vision_config": {
            "architectures": ["SiglipVisionModel"], "model_type": "siglip_vision_model",
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "image_size": 448, "patch_size": 14, "num_channels": 3,
            "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "attention_dropout": 0.0,
            "vision_use_head": False,
        },
    }


def write_tiny(folder: Path, seed: int = 0) -> None:
    """Write config, tokenizer and model.safetensors (official key names) into `folder`."""
    _write(folder, tiny_config, seed)


def mob_vision_config(siglip: dict) -> dict:
    """Eagle2-9B's MOB vision_config at toy sizes (the ConvNeXt's shape given explicitly)."""
    return {"model_type": "MOB", "vision_path": "MOB:palisiglip;convnext-1024",
            "hidden_size": "lazy_calculation", "moe_version_type": "convnext_512_siglip_448",
            "convnext_img_size": 512, "grid_size": 32, "normalize_type": "siglip",
            "convnext_depths": [1, 1, 2, 1], "convnext_dims": [16, 24, 32, 48],
            "siglip_vision_config": siglip}


def write_tiny_mob(folder: Path, seed: int = 0) -> None:
    """`tiny` with Eagle2-9B's two towers; ConvNeXt's layer scale stored as `weight`, as the
    9B's own code names it, and its classifier head present (unused), as in the 9B."""
    def config(vocab: int) -> dict:
        raw = tiny_config(vocab)
        raw["vision_config"] = mob_vision_config(raw["vision_config"])
        return raw

    def extra(model, tensors: dict) -> None:
        from service.engine.mob import TOWER
        tensors[TOWER.format(1) + "head.fc.weight"] = torch.zeros(10, 48)

    _write(folder, config, seed, layer_scale_as="weight", extra=extra)


def write_tiny_25(folder: Path, seed: int = 0) -> None:
    """`tiny` in the `eagle_2_5_vl` layout with its processor's files."""
    from service.engine.processor_prompt import BUILTIN_TEMPLATE

    def config(vocab: int) -> dict:
        legacy = tiny_config(vocab)
        text = legacy.pop("llm_config")
        return {**{k: v for k, v in legacy.items() if k not in (
            "max_dynamic_patch", "min_dynamic_patch", "ps_version")},
            "architectures": ["Eagle2_5_VLForConditionalGeneration"],
            "model_type": "eagle_2_5_vl", "text_config": text, "max_dynamic_tiles": 12,
            "min_dynamic_tiles": 1, "image_token_index": None}

    def extra(model, tensors: dict) -> None:
        # more embedding rows than the tokenizer has; SigLIP's pooling head, unused
        embed = "language_model.model.embed_tokens.weight"
        tensors[embed] = torch.cat([tensors[embed], torch.zeros(32, tensors[embed].shape[1])])
        tensors["vision_model.vision_model.head.probe"] = torch.zeros(1, 1, 64)
        tensors["vision_model.vision_model.head.mlp.fc1.weight"] = torch.zeros(128, 64)

    _write(folder, config, seed, extra=extra)
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": BUILTIN_TEMPLATE}))
    (folder / "processor_config.json").write_text(json.dumps({
        "processor_class": "Eagle2_5_VLProcessor", "image_token": "<IMG_CONTEXT>",
        "video_token": "<IMG_CONTEXT>", "image_start_token": "<img>",
        "image_end_token": "</img>", "image_placeholder": "image",
        "video_placeholder": "video", "tokens_per_tile": 256}, indent=2) + "\n")


def _write(folder: Path, config, seed: int, layer_scale_as: str = "gamma", extra=None) -> None:
    from service.engine.config import parse_config
    from service.engine.keys import official_names
    from service.engine.model import Eagle2Model

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    tokenizer.save_pretrained(str(folder))
    raw = config(len(tokenizer))
    raw = {k: v for k, v in raw.items() if v is not None}
    (folder / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    torch.manual_seed(seed)
    model = Eagle2Model(parse_config(raw))
    with torch.no_grad():  # random, but with a scale that keeps activations lively
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 1.0 if "embed" in name else 0.2)
            elif name.endswith(".gamma"):  # ConvNeXt's layer scale: not timm's 1e-6 init
                p.uniform_(0.5, 1.5)
    params = dict(model.named_parameters())
    tensors = {}
    for name, official in official_names(model).items():
        if official.endswith(".gamma"):  # ConvNeXt's layer scale, named as asked
            official = official[: -len("gamma")] + layer_scale_as
        tensors[official] = params[name].detach().contiguous()
    if extra is not None:
        extra(model, tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}) + "\n")


VARIANTS = {"tiny": write_tiny, "tiny-mob": write_tiny_mob, "tiny-2.5": write_tiny_25}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for variant in VARIANTS:
        print(ensure_tiny(variant=variant))


if __name__ == "__main__":
    main()
