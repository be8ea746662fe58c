"""Eagle2 checkpoint configs in both on-disk layouts (eagle_chat, eagle_2_5_vl), parsed once."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import AutoConfig, PretrainedConfig, SiglipVisionConfig

from service.engine.job import ModelLoadError
from service.engine.mob import MobConfig, parse_mob


@dataclass
class EagleConfig:
    """What the engine needs from config.json, whichever layout it came in."""

    model_type: str
    vision: SiglipVisionConfig
    text: PretrainedConfig
    select_layer: int = -1
    downsample_ratio: float = 0.5
    image_size: int = 448
    template: str = "qwen2-chat"
    dynamic_image_size: bool = True
    use_thumbnail: bool = True
    min_tiles: int = 1
    max_tiles: int = 12
    image_token_index: int | None = None
    mlp_connector_layers: int = 2
    use_pixel_shuffle: bool = True
    tie_word_embeddings: bool = False
    mob: MobConfig | None = None  # Eagle2-9B's SigLIP + ConvNeXt towers (else SigLIP alone)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def patch_tokens(self) -> int:
        """Vision tokens per tile: (image_size / patch_size)^2 * downsample_ratio^2."""
        side = self.image_size // self.vision.patch_size
        ratio = self.downsample_ratio if self.use_pixel_shuffle else 1.0
        return int(side * side * ratio * ratio)

    @property
    def projector_in(self) -> int:
        factor = int(round(1 / self.downsample_ratio)) ** 2 if self.use_pixel_shuffle else 1
        return self.vision.hidden_size * factor + (self.mob.width if self.mob else 0)


def read_config(folder: Path) -> EagleConfig:
    """Parse `folder/config.json`; refuses layouts and towers we cannot serve, saying why."""
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path} is missing: not an Eagle2 checkpoint folder") from None
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path} is not valid JSON ({exc})") from None
    return parse_config(raw, source=str(path))


def parse_config(raw: dict[str, Any], source: str = "config.json") -> EagleConfig:
    model_type = raw.get("model_type")
    if model_type == "eagle_chat":
        text_raw, min_key, max_key = raw.get("llm_config"), "min_dynamic_patch", "max_dynamic_patch"
    elif model_type == "eagle_2_5_vl":
        text_raw, min_key, max_key = raw.get("text_config"), "min_dynamic_tiles", "max_dynamic_tiles"
    else:
        raise ModelLoadError(f"{source}: model_type {model_type!r} is not an Eagle2 layout; "
                             f"expected 'eagle_chat' or 'eagle_2_5_vl'")
    vision_raw = dict(raw.get("vision_config") or {})
    vision_type = str(vision_raw.get("model_type", ""))
    mob = None
    if vision_type.startswith("MOB"):  # Eagle2-9B: SigLIP + ConvNeXt
        vision_cfg, mob = parse_mob(vision_raw, int(raw.get("select_layer", -1)), source)
    elif vision_type != "siglip_vision_model":
        raise ModelLoadError(f"{source}: vision_config.model_type {vision_type!r} is not "
                             f"supported; expected 'siglip_vision_model' or 'MOB'")
    if not isinstance(text_raw, dict):
        key = "llm_config" if model_type == "eagle_chat" else "text_config"
        raise ModelLoadError(f"{source}: {key} is missing")
    text_type = text_raw.get("model_type", "qwen2")
    try:
        text_cfg = AutoConfig.for_model(text_type, **_config_kwargs(text_raw))
    except ValueError:
        raise ModelLoadError(f"{source}: language model type {text_type!r} is not known to "
                             f"transformers") from None
    text_cfg.use_cache = True
    if mob is None:
        vision_cfg = SiglipVisionConfig(**_config_kwargs(vision_raw))
        vision_cfg.vision_use_head = False
    tie = bool(raw.get("tie_word_embeddings", text_raw.get("tie_word_embeddings", False)))
    text_cfg.tie_word_embeddings = tie
    return EagleConfig(
        model_type=model_type,
        vision=vision_cfg,
        text=text_cfg,
        select_layer=int(raw.get("select_layer", -1)),
        downsample_ratio=float(raw.get("downsample_ratio", 0.5)),
        image_size=int(raw.get("force_image_size") or vision_cfg.image_size),
        template=str(raw.get("template", "qwen2-chat")),
        dynamic_image_size=bool(raw.get("dynamic_image_size", True)),
        use_thumbnail=bool(raw.get("use_thumbnail", True)),
        min_tiles=int(raw.get(min_key, 1)),
        max_tiles=int(raw.get(max_key, 12)),
        image_token_index=raw.get("image_token_index"),
        mlp_connector_layers=int(raw.get("mlp_connector_layers", 2)),
        use_pixel_shuffle=bool(raw.get("use_pixel_shuffle", True)),
        tie_word_embeddings=tie,
        mob=mob,
        raw=raw,
    )


# Keys that describe the remote code or training, not the architecture.
_DROP = {"architectures", "auto_map", "_name_or_path", "transformers_version", "torch_dtype",
         "_attn_implementation", "attn_implementation", "_attn_implementation_autoset",
         "_commit_hash", "model_type", "use_cache", "dtype"}


def _config_kwargs(raw: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in raw.items() if k not in _DROP}
