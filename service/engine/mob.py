"""Eagle2-9B's two-tower vision ("MOB"): SigLIP and timm's ConvNeXt over the same tile, their
features side by side ([SigLIP 4 x hidden | ConvNeXt last width] = 7680 for the 9B) into mlp1.

SigLIP sees the 448 tile as Eagle2 does (last hidden state, pixel shuffle). ConvNeXt sees it
resized to 512 (bilinear, align_corners) and renormalised from SigLIP's mean/std to
OpenAI-CLIP's, each computed in float32 and rounded to the tiles' dtype after it, then runs
in bfloat16 whatever the model's dtype: the hub's tower casts itself and its input so
(CONVNEXT_DTYPE). Its last stage's 16 x 16 map is flattened row-major, 256 tokens like
SigLIP's. No final norm and no head (`head.*` in a checkpoint is unused).
Facts and what is unverified: shared/reference/eagle-family.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import SiglipVisionConfig, SiglipVisionModel

from service.engine.job import ModelLoadError

# timm's convnext_xxlarge, which the 9B's tower is (its config names it only by the tower's
# name); a checkpoint config may carry `convnext_depths`/`convnext_dims` instead (tiny-mob).
XXLARGE = ((3, 4, 30, 3), (384, 768, 1536, 3072))
CONVNEXT_NORM_EPS = 1e-5  # timm's convnext_xxlarge
TOWER_KINDS = {"palisiglip": "siglip", "siglip": "siglip", "convnext-1024": "convnext",
               "convnext": "convnext"}
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TOWER = "vision_model.vision_model.vision_towers.{}.vision_tower."
CONVNEXT_DTYPE = torch.bfloat16  # the hub's ConvNextVisionTower casts itself to it at load


def param_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a loaded parameter takes: the model's, but ConvNeXt's is always bfloat16."""
    return CONVNEXT_DTYPE if name.startswith("vision_model.convnext.") else dtype


@dataclass(frozen=True)
class MobConfig:
    """The two towers: which checkpoint index holds which, and ConvNeXt's shape."""

    order: tuple[str, ...]  # tower kind by checkpoint index, e.g. ("siglip", "convnext")
    depths: tuple[int, ...] = XXLARGE[0]
    dims: tuple[int, ...] = XXLARGE[1]
    convnext_size: int = 512
    named_xxlarge: bool = True  # built as timm's convnext_xxlarge (else from depths/dims)

    @property
    def width(self) -> int:
        return self.dims[-1]

    def index(self, kind: str) -> int:
        return self.order.index(kind)


def parse_mob(vision: dict[str, Any], select_layer: int,
              source: str) -> tuple[SiglipVisionConfig, MobConfig]:
    """The SigLIP config and the tower layout of a MOB vision_config; errors name the key."""
    where = f"{source}: vision_config"
    path = vision.get("vision_path")
    if not isinstance(path, str) or not path.startswith("MOB:"):
        raise ModelLoadError(f"{where}.vision_path {path!r} is not 'MOB:<tower>;<tower>'")
    names = [n for n in path[4:].split(";") if n]
    unknown = [n for n in names if n not in TOWER_KINDS]
    if unknown or sorted(TOWER_KINDS[n] for n in names) != ["convnext", "siglip"]:
        raise ModelLoadError(f"{where}.vision_path {path!r}: expected one SigLIP tower "
                             f"(palisiglip) and one ConvNeXt tower (convnext-1024)"
                             + (f"; unknown: {', '.join(unknown)}" if unknown else ""))
    mode = vision.get("moe_version_type", "convnext_512_siglip_448")
    if mode != "convnext_512_siglip_448":
        raise ModelLoadError(f"{where}.moe_version_type {mode!r}: only "
                             f"'convnext_512_siglip_448' is served")
    if select_layer != -1:
        raise ModelLoadError(f"{source}: select_layer is {select_layer}; the MOB towers use "
                             f"their last layer (-1)")
    siglip = vision.get("siglip_vision_config")
    if not isinstance(siglip, dict):
        raise ModelLoadError(f"{where}.siglip_vision_config is missing: the SigLIP tower's "
                             f"settings")
    hidden = vision.get("hidden_size", "lazy_calculation")
    if not (hidden == "lazy_calculation" or isinstance(hidden, int)):
        raise ModelLoadError(f"{where}.hidden_size {hidden!r} is neither a width nor "
                             f"'lazy_calculation'")
    depths, dims = vision.get("convnext_depths"), vision.get("convnext_dims")
    if (depths is None) != (dims is None):
        raise ModelLoadError(f"{where}: convnext_depths and convnext_dims go together")
    drop = {"architectures", "auto_map", "model_type", "torch_dtype", "_name_or_path",
            "transformers_version"}
    siglip_cfg = SiglipVisionConfig(**{k: v for k, v in siglip.items() if k not in drop})
    siglip_cfg.vision_use_head = False
    mob = MobConfig(order=tuple(TOWER_KINDS[n] for n in names),
                    depths=tuple(depths or XXLARGE[0]), dims=tuple(dims or XXLARGE[1]),
                    convnext_size=int(vision.get("convnext_img_size", 512)),
                    named_xxlarge=depths is None)
    if isinstance(hidden, int) and hidden != 4 * siglip_cfg.hidden_size + mob.width:
        raise ModelLoadError(f"{where}.hidden_size {hidden} does not match the towers "
                             f"({4 * siglip_cfg.hidden_size} + {mob.width})")
    return siglip_cfg, mob


def build_convnext(mob: MobConfig) -> nn.Module:
    """timm's ConvNeXt (never downloaded), its classifier head removed."""
    if mob.named_xxlarge:
        import timm

        net = timm.create_model("convnext_xxlarge", pretrained=False)
    else:
        from timm.models.convnext import ConvNeXt

        net = ConvNeXt(depths=mob.depths, dims=mob.dims, norm_eps=CONVNEXT_NORM_EPS)
    net.head = nn.Identity()  # unused: the features are the last stage's map
    return net


class MobVision(nn.Module):
    """Both towers; `features` gives (n, 256, 4 x siglip hidden + ConvNeXt width)."""

    def __init__(self, siglip: SiglipVisionConfig, mob: MobConfig, shuffle) -> None:
        super().__init__()
        self.mob = mob
        self.siglip = SiglipVisionModel(siglip)
        self.convnext = build_convnext(mob)
        self._shuffle = shuffle  # model.pixel_shuffle (0.5), passed in to avoid an import loop
        scale = [s / c for s, c in zip(SIGLIP_STD, CLIP_STD)]
        shift = [(m - c) / d for m, c, d in zip(SIGLIP_MEAN, CLIP_MEAN, CLIP_STD)]
        self.register_buffer("to_clip_scale", torch.tensor(scale).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("to_clip_shift", torch.tensor(shift).view(1, 3, 1, 1),
                             persistent=False)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(n, 3, 448, 448) SigLIP-normalised tiles -> (n, 256, 4h + C)."""
        s = self.siglip(pixel_values=pixel_values).last_hidden_state  # (n, 1024, h)
        n, tokens, h = s.shape
        side = int(tokens ** 0.5)
        s = self._shuffle(s.reshape(n, side, side, h)).reshape(n, -1, 4 * h)  # (n, 256, 4h)
        # upstream's order: resize in float32, round to the tiles' dtype; renormalise in
        # float32, round again; the tower's own dtype last
        dtype = pixel_values.dtype
        x = F.interpolate(pixel_values.float(), size=(self.mob.convnext_size,) * 2,
                          mode="bilinear", align_corners=True).to(dtype)
        x = (x.float() * self.to_clip_scale.float() + self.to_clip_shift.float()).to(dtype)
        first = next(self.convnext.parameters())
        c = self.convnext.forward_features(x.to(first.dtype))  # (n, C, 16, 16)
        c = c.flatten(2).transpose(1, 2)  # (n, 256, C), row-major over the map
        return torch.cat([s, c.to(s.dtype)], dim=-1)


def official_mob_names(model: nn.Module, mob: MobConfig, layer_scale: str = "gamma"
                       ) -> dict[str, str]:
    """MobVision parameter name -> checkpoint name, for the order in `mob`. The ConvNeXt
    block's layer scale is `gamma` in timm and `weight` in the 9B's own code."""
    names = {}
    s_prefix = TOWER.format(mob.index("siglip")) + "vision_model."
    c_prefix = TOWER.format(mob.index("convnext"))
    for name, _ in model.named_parameters():
        if name.startswith("vision_model.siglip."):
            inner = name[len("vision_model.siglip."):].removeprefix("vision_model.")
            names[name] = s_prefix + inner
        elif name.startswith("vision_model.convnext."):
            inner = name[len("vision_model.convnext."):]
            if inner.endswith(".gamma") and layer_scale != "gamma":
                inner = inner[: -len("gamma")] + layer_scale
            names[name] = c_prefix + inner
    return names


def order_from_keys(keys, configured: tuple[str, ...]) -> tuple[str, ...]:
    """The tower order the checkpoint's keys show (ConvNeXt's have `stem.`, SigLIP's
    `vision_model.`); the configured order when the keys say nothing."""
    found: dict[int, str] = {}
    for key in keys:
        for i in (0, 1):
            prefix = TOWER.format(i)
            if key.startswith(prefix + "stem."):
                found[i] = "convnext"
            elif key.startswith(prefix + "vision_model."):
                found[i] = "siglip"
    if sorted(found) == [0, 1] and sorted(found.values()) == ["convnext", "siglip"]:
        return (found[0], found[1])
    return configured


def layer_scale_name(keys, mob: MobConfig) -> str:
    """`weight` when the checkpoint stores the ConvNeXt layer scale that way, else `gamma`."""
    prefix = TOWER.format(mob.index("convnext"))
    for key in keys:
        if key.startswith(prefix + "stages.") and ".blocks." in key:
            tail = key[len(prefix):].split(".")  # stages, s, blocks, n, <param>
            if len(tail) == 5 and tail[4] in ("weight", "gamma"):
                return tail[4]
    return "gamma"


__all__ = ["CONVNEXT_DTYPE", "MobConfig", "MobVision", "build_convnext", "layer_scale_name",
           "official_mob_names", "order_from_keys", "param_dtype", "parse_mob"]
