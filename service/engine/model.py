"""Eagle2 in plain transformers: SigLIP tower -> pixel shuffle -> mlp1 -> splice into Qwen2."""
from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForCausalLM, SiglipVisionModel

from service.engine.config import EagleConfig
from service.engine.mob import MobVision


def pixel_shuffle(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """(n, h, w, c) -> (n, h*ratio, w*ratio, c/ratio^2), as Eagle2/InternVL ("v2") order channels.

    Output token (r, c) concatenates input tokens (2r,2c), (2r,2c+1), (2r+1,2c), (2r+1,2c+1),
    each c channels wide, for ratio 0.5.
    """
    n, h, w, c = x.shape
    k = int(round(1 / ratio))
    if h % k or w % k:
        raise ValueError(f"pixel_shuffle needs a grid divisible by {k}, got {h}x{w}")
    # (n, h/k, k, w/k, k, c) -> (n, h/k, w/k, k, k, c): block rows, block cols, then offsets
    x = x.reshape(n, h // k, k, w // k, k, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, h // k, w // k, k * k * c)


def build_projector(cfg: EagleConfig) -> nn.Module:
    """mlp1: LayerNorm, Linear, GELU, Linear (indices 0, 1, 3 hold weights), or one Linear."""
    hidden = cfg.text.hidden_size
    if cfg.mlp_connector_layers == 1:
        return nn.Sequential(nn.Linear(cfg.projector_in, hidden))
    return nn.Sequential(nn.LayerNorm(cfg.projector_in), nn.Linear(cfg.projector_in, hidden),
                         nn.GELU(), nn.Linear(hidden, hidden))


class Eagle2Model(nn.Module):
    """The three parts under the checkpoint's own names: vision_model, mlp1, language_model."""

    def __init__(self, cfg: EagleConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision_model = (MobVision(cfg.vision, cfg.mob, pixel_shuffle) if cfg.mob
                             else SiglipVisionModel(cfg.vision))
        self.mlp1 = build_projector(cfg)
        self.language_model = AutoModelForCausalLM.from_config(cfg.text)

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.language_model.get_input_embeddings()

    def encode_tiles(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(n, 3, 448, 448) normalised tiles -> (n, 256, hidden) LLM-space vision embeddings."""
        if self.cfg.mob is not None:  # both towers: (n, 256, 4h + C)
            return self.mlp1(self.vision_model.features(pixel_values))
        select = self.cfg.select_layer
        out = self.vision_model(pixel_values=pixel_values, output_hidden_states=select != -1)
        feats = out.last_hidden_state if select == -1 else out.hidden_states[select]
        n, tokens, c = feats.shape  # (n, 1024, c): a 32x32 patch grid, row-major
        side = int(tokens ** 0.5)
        feats = feats.reshape(n, side, side, c)
        if self.cfg.use_pixel_shuffle:
            feats = pixel_shuffle(feats, self.cfg.downsample_ratio)  # (n, 16, 16, 4c)
        feats = feats.reshape(n, -1, feats.shape[-1])  # (n, 256, 4c)
        return self.mlp1(feats)  # (n, 256, hidden)

    def embed(self, input_ids: torch.Tensor, vision: torch.Tensor | None,
              image_token_id: int) -> torch.Tensor:
        """Token embeddings (L, hidden) with the image-context positions overwritten in order.

        `vision` is (tiles, 256, hidden); the number of image-context tokens in input_ids
        must equal tiles * 256.
        """
        embeds = self.embed_tokens(input_ids)
        if vision is None or vision.numel() == 0:
            return embeds
        mask = input_ids == image_token_id
        flat = vision.reshape(-1, vision.shape[-1]).to(embeds.dtype)
        if int(mask.sum()) != flat.shape[0]:
            raise ValueError(f"the prompt has {int(mask.sum())} image-context tokens but the "
                             f"vision tower produced {flat.shape[0]} embeddings")
        embeds = embeds.clone()
        embeds[mask] = flat
        return embeds
