"""The official checkpoints' key names for the model's parameters: one mapping, used by the
loader to read checkpoints and by the tiny model's writer to write them (so neither imports
the other)."""
from __future__ import annotations

import logging
from dataclasses import replace

from service.engine import mob as mob_module
from service.engine.model import Eagle2Model

log = logging.getLogger(__name__)


def official_names(model: Eagle2Model, keys=None) -> dict[str, str]:
    """Module parameter name -> the name the official checkpoints store it under.

    transformers 5 flattened SiglipVisionModel (no inner `vision_model.`); the checkpoints
    keep the inner prefix, so it is put back here. Tied lm_head is left out. For Eagle2-9B's
    two towers, the checkpoint's `keys` (when given) decide the tower order and the name of
    ConvNeXt's layer scale.
    """
    names = {}
    mob = model.cfg.mob
    if mob is not None:
        scale = "gamma"
        if keys is not None:
            order = mob_module.order_from_keys(keys, mob.order)
            if order != mob.order:
                log.warning("the checkpoint's keys put the towers in the order %s, its "
                            "vision_path says %s: following the keys", order, mob.order)
                mob = replace(mob, order=order)
            scale = mob_module.layer_scale_name(keys, mob)
        names = mob_module.official_mob_names(model, mob, scale)
    for name, _ in model.named_parameters():
        if name in names:
            continue
        if name.startswith("vision_model.") and not name.startswith("vision_model.vision_model."):
            names[name] = "vision_model." + name
        else:
            names[name] = name
    if model.cfg.tie_word_embeddings:
        names.pop("language_model.lm_head.weight", None)
    return names


__all__ = ["official_names"]
