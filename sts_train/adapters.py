"""Model adapters: where a model family keeps its decoder layers, vision tower and image tokens.

Both packages find model parts only through an adapter, so supporting another LLaVA-style
family means registering one more function in :data:`ADAPTERS`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from sts_train.errors import ModelError

if TYPE_CHECKING:
    import torch.nn as nn


@dataclass(frozen=True)
class ModelParts:
    """Static facts and module handles of one loaded model."""

    family: str
    decoder_layers: "nn.ModuleList"
    language_model: "nn.Module"
    vision_tower: "nn.Module"
    projector: "nn.Module"
    image_token_id: int
    num_visual_tokens: int  # per image, after the feature-select strategy
    patch_grid: tuple[int, int]  # (rows, cols) of the visual tokens, row-major
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    vision_feature_layer: int
    vision_feature_select_strategy: str

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers)


def _llava_parts(model) -> ModelParts:
    cfg = model.config
    text, vision = cfg.text_config, cfg.vision_config
    inner = model.model  # LlavaModel
    side = vision.image_size // vision.patch_size
    strategy = cfg.vision_feature_select_strategy
    cls = strategy == "full" and has_class_token(inner.vision_tower)  # "default" drops it
    n_visual = side * side + (1 if cls else 0)
    if cls:
        grid = (n_visual, 1)  # a CLS token breaks the square grid: treat tokens as a 1-D row
    else:
        grid = (side, side)
    heads = text.num_attention_heads
    return ModelParts(
        family="llava",
        decoder_layers=inner.language_model.layers,
        language_model=inner.language_model,
        vision_tower=inner.vision_tower,
        projector=inner.multi_modal_projector,
        image_token_id=int(cfg.image_token_id),
        num_visual_tokens=n_visual,
        patch_grid=grid,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_heads=heads,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        vocab_size=text.vocab_size,
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=strategy,
    )


def has_class_token(vision_tower) -> bool:
    """Does the vision tower prepend a class token to its patches (CLIP does, SigLIP does not)?"""
    return any(name.endswith("class_embedding") for name, _ in vision_tower.named_parameters())


ADAPTERS: dict[str, Callable[[object], ModelParts]] = {"llava": _llava_parts}


def model_parts(model) -> ModelParts:
    """Return the :class:`ModelParts` of a loaded model.

    Raises:
        ModelError: the model family has no adapter.
    """
    family = getattr(getattr(model, "config", None), "model_type", None)
    if family not in ADAPTERS:
        raise ModelError(
            f"model type {family!r} is not supported; supported: {', '.join(ADAPTERS)} "
            "(LLaVA-style models with a Llama-family decoder)"
        )
    return ADAPTERS[family](model)


def grid_of(num_tokens: int) -> tuple[int, int]:
    """Best (rows, cols) grid for ``num_tokens`` tokens: square when possible, else one row."""
    side = math.isqrt(num_tokens)
    return (side, side) if side * side == num_tokens else (1, num_tokens)
