"""Pixtral checkpoints (Pixtral 12B; Mistral Small 3.1/3.2, with a patch merger): a dense decoder
and a vision tower, in both layouts.

- Native: `params.json` with a `vision_encoder` block; keys `vision_encoder.*`,
  `vision_language_adapter.*`, optional `pre_mm_projector_norm.weight` and
  `patch_merger.merging_layer.weight`, and the decoder's as in `dense.py`.
- Hugging Face: `LlavaForConditionalGeneration` (Pixtral 12B) or
  `Mistral3ForConditionalGeneration` (Mistral Small 3.1) with a `PixtralVisionModel` tower. The
  Hub's files name the parts `language_model.model.*`, `language_model.lm_head`, `vision_tower.*`
  and `multi_modal_projector.*`; what transformers 4.52+ saves puts them under `model.` (and the
  head at `lm_head`): both are read. q/k rows are in Hugging Face's rotary layout in the decoder
  and in the vision encoder; both are permuted to the native layout.

The image token id is the checkpoint's (`image_token_id` / `image_token_index`); the tokenizer's
image settings (patch size, merge size, the `[IMG]` id) must agree with it (`check_tokenizer`).
Missing Hugging Face fields take transformers' defaults, so a folder means what it means there.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Any

import torch
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from torch import nn

from ..arch.config import TransformerConfig, VisionConfig
from ..arch.transformer import Transformer
from ..errors import ModelLoadError
from . import dense
from .family import BlockCount
from .files import read_json

log = logging.getLogger(__name__)

HF_ARCHITECTURES = ("LlavaForConditionalGeneration", "Mistral3ForConditionalGeneration")
PATCH_MERGE = "patch_merge"
_VISION_LAYER = re.compile(r"^vision\.encoder\.transformer\.layers\.(\d+)\.")

# transformers' defaults for what a `config.json` may leave out.
_MISTRAL_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-6, "sliding_window": 4096, "max_position_embeddings": 4096 * 32,
}
_PIXTRAL_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
    "num_attention_heads": 16, "num_channels": 3, "image_size": 1024, "patch_size": 16,
    "hidden_act": "gelu",
}
# Per architecture: (multimodal_projector_bias, spatial_merge_size, tie_word_embeddings) defaults.
_HF_DEFAULTS = {
    "LlavaForConditionalGeneration": (True, 1, False),
    "Mistral3ForConditionalGeneration": (False, 2, True),
}


# ---------------------------------------------------------------------------------------------
# Configs


def _vision(path: Path, **kwargs: Any) -> VisionConfig:
    try:
        return VisionConfig(**kwargs)
    except (ValueError, TypeError) as e:
        raise ModelLoadError(path, str(e)) from None


def _with_vision(path: Path, text: TransformerConfig, vision: VisionConfig) -> TransformerConfig:
    extras = {k: v for k, v in text.extras.items() if k != "vision_encoder"}
    try:
        return dataclasses.replace(text, vision=vision, extras=extras)
    except ValueError as e:
        raise ModelLoadError(path, str(e)) from None


def from_params(path: Path) -> TransformerConfig:
    """A native `params.json` whose `vision_encoder` block describes the tower.

    As in mistral-inference, the patch merger exists when `mm_projector_id` is "patch_merge"
    (then `spatial_merge_size` applies), the norm before it when
    `add_pre_mm_projector_layer_norm` is true, and the adapter has biases unless `adapter_bias`
    is false.
    """
    data = read_json(path)
    block = data["vision_encoder"]
    if not isinstance(block, dict):
        raise ModelLoadError(path, f"vision_encoder must be an object, got {block!r}")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "patch_size", "image_size"):
        if key not in block:
            raise ModelLoadError(path, f"missing required field 'vision_encoder.{key}'")
    projector = block.get("mm_projector_id") or ""
    if projector not in ("", PATCH_MERGE):
        raise ModelLoadError(path, f"vision_encoder.mm_projector_id {projector!r} is not "
                             f"supported (only {PATCH_MERGE!r})")
    vision = _vision(
        path, dim=block["hidden_size"], n_layers=block["num_hidden_layers"],
        n_heads=block["num_attention_heads"], hidden_dim=block["intermediate_size"],
        patch_size=block["patch_size"], image_size=block["image_size"],
        num_channels=block.get("num_channels", 3),
        rope_theta=float(block.get("rope_theta", 10_000.0)),
        image_token_id=block.get("image_token_id", 10),
        adapter_bias=bool(block.get("adapter_bias", True)),
        spatial_merge_size=block.get("spatial_merge_size", 1) if projector else 1,
        pre_norm=bool(block.get("add_pre_mm_projector_layer_norm", False)))
    return _with_vision(path, dense.from_params(path), vision)


def _hf_rope_theta(data: dict[str, Any], default: float) -> float:
    rope = data.get("rope_parameters") or {}
    return float(rope.get("rope_theta", data.get("rope_theta", default)))


def from_hf_config(path: Path) -> TransformerConfig:
    """A `config.json` of `LlavaForConditionalGeneration` / `Mistral3ForConditionalGeneration`
    with a Pixtral vision tower and a Mistral text model."""
    data = read_json(path)
    arch = next(a for a in data.get("architectures") or [] if a in HF_ARCHITECTURES)
    bias_default, merge_default, tie_default = _HF_DEFAULTS[arch]
    text = data.get("text_config")
    vision = data.get("vision_config")
    if not isinstance(text, dict) or not isinstance(vision, dict):
        raise ModelLoadError(path, "a vision model's config needs text_config and vision_config "
                             "objects")
    if vision.get("model_type", "pixtral") != "pixtral":
        raise ModelLoadError(path, f"vision tower {vision.get('model_type')!r} is not supported "
                             "(only Pixtral's)")
    if text.get("model_type", "mistral") != "mistral":
        raise ModelLoadError(path, f"text model {text.get('model_type')!r} is not supported "
                             "(only Mistral's)")
    unsupported = {"vision_feature_layer": -1, "projector_hidden_act": "gelu"}
    if arch == "LlavaForConditionalGeneration":
        unsupported["vision_feature_select_strategy"] = "full"
    for key, want in unsupported.items():
        if data.get(key, want) != want:
            raise ModelLoadError(path, f"{key}={data[key]!r} is not supported (Pixtral's "
                                 f"checkpoints use {want!r})")
    tied = data.get("tie_word_embeddings", text.get("tie_word_embeddings", tie_default))
    decoder = dense.from_hf_dict({**_MISTRAL_TEXT_DEFAULTS, **text,
                                  "tie_word_embeddings": tied}, path)
    v = {**_PIXTRAL_VISION_DEFAULTS, **vision}
    if v.get("head_dim") not in (None, v["hidden_size"] // max(v["num_attention_heads"], 1)):
        raise ModelLoadError(path, f"vision_config.head_dim ({v['head_dim']}) must be "
                             "hidden_size / num_attention_heads")
    merge = data.get("spatial_merge_size", merge_default)
    tower = _vision(
        path, dim=v["hidden_size"], n_layers=v["num_hidden_layers"],
        n_heads=v["num_attention_heads"], hidden_dim=v["intermediate_size"],
        patch_size=v["patch_size"], image_size=v["image_size"], num_channels=v["num_channels"],
        rope_theta=_hf_rope_theta(v, 10_000.0), activation=v["hidden_act"],
        image_token_id=data.get("image_token_index", data.get("image_token_id", 10)),
        adapter_bias=bool(data.get("multimodal_projector_bias", bias_default)),
        spatial_merge_size=merge if arch == "Mistral3ForConditionalGeneration" else 1,
        pre_norm=arch == "Mistral3ForConditionalGeneration",
        pre_norm_eps=float(text.get("rms_norm_eps", _MISTRAL_TEXT_DEFAULTS["rms_norm_eps"])))
    return _with_vision(path, decoder, tower)


# ---------------------------------------------------------------------------------------------
# Weight names


_NATIVE_TOP = {
    "vision_encoder.": "vision.encoder.",
    "vision_language_adapter.": "vision.adapter.",
    "pre_mm_projector_norm.": "vision.pre_norm.",
    "patch_merger.": "vision.merger.",
}
_HF_VISION_LAYER = {  # PixtralVisionModel's names -> ours, inside transformer.layers.N
    "attention.q_proj": "attention.wq", "attention.k_proj": "attention.wk",
    "attention.v_proj": "attention.wv", "attention.o_proj": "attention.wo",
    "feed_forward.gate_proj": "feed_forward.w1", "feed_forward.down_proj": "feed_forward.w2",
    "feed_forward.up_proj": "feed_forward.w3",
}
_HF_PROJECTOR = {
    "linear_1.": "vision.adapter.w_in.", "linear_2.": "vision.adapter.w_out.",
    "norm.": "vision.pre_norm.", "patch_merger.": "vision.merger.",
}
_HF_LAYER = re.compile(r"^transformer\.layers\.(\d+)\.(attention\.[qkvo]_proj|"
                       r"feed_forward\.(?:gate|up|down)_proj)\.weight$")
# Stored prefixes of each part: the Hub's (transformers < 4.52), then transformers' current one.
_HF_TEXT = ("language_model.model.", "model.language_model.")
_HF_HEAD = ("language_model.lm_head.weight", "lm_head.weight")
_HF_TOWER = ("vision_tower.", "model.vision_tower.")
_HF_PROJ = ("multi_modal_projector.", "model.multi_modal_projector.")


def _strip(name: str, prefixes: tuple[str, ...]) -> str | None:
    for prefix in prefixes:
        if name.startswith(prefix):
            return name[len(prefix):]
    return None


def hf_to_ours(name: str) -> str | None:
    if name in _HF_HEAD:
        return "output.weight"
    if (rest := _strip(name, _HF_TEXT)) is not None:
        return dense.hf_to_native_name("model." + rest)
    if (rest := _strip(name, _HF_TOWER)) is not None:
        m = _HF_LAYER.match(rest)
        if m:
            return (f"vision.encoder.transformer.layers.{m.group(1)}."
                    f"{_HF_VISION_LAYER[m.group(2)]}.weight")
        return "vision.encoder." + rest
    if (rest := _strip(name, _HF_PROJ)) is not None:
        for theirs, ours in _HF_PROJECTOR.items():
            if rest.startswith(theirs):
                return ours + rest[len(theirs):]
    return None


def ours_to_hf(name: str) -> str:
    """The Hub's name of one of our tensors (as the Hub's files spell them)."""
    if name == "output.weight":
        return _HF_HEAD[0]
    if name.startswith("vision.encoder."):
        rest = name[len("vision.encoder."):]
        for theirs, ours in _HF_VISION_LAYER.items():
            rest = rest.replace(f".{ours}.", f".{theirs}.")
        return _HF_TOWER[0] + rest
    for theirs, ours in _HF_PROJECTOR.items():
        if name.startswith(ours):
            return _HF_PROJ[0] + theirs + name[len(ours):]
    return _HF_TEXT[0] + dense.native_to_hf_name(name).removeprefix("model.")


def native_to_ours(name: str) -> str:
    for native, ours in _NATIVE_TOP.items():
        if name.startswith(native):
            return ours + name[len(native):]
    return name


def ours_to_native(name: str) -> str:
    for native, ours in _NATIVE_TOP.items():
        if name.startswith(ours):
            return native + name[len(ours):]
    return name


def _rotary_heads(ours: str, config: TransformerConfig) -> tuple[int, int] | None:
    """(heads, head_dim) of a q/k weight whose rows are in a rotary layout, else None."""
    assert config.vision is not None
    if ours.startswith("vision.encoder.") and ours.endswith(("attention.wq.weight",
                                                             "attention.wk.weight")):
        return config.vision.n_heads, config.vision.head_dim
    if ours.startswith("layers."):
        if ours.endswith("attention.wq.weight"):
            return config.n_heads, config.head_dim
        if ours.endswith("attention.wk.weight"):
            return config.n_kv_heads, config.head_dim
    return None


def state_dict_to_native(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {ours_to_native(k): v for k, v in state.items()}


def state_dict_to_hf(state: dict[str, torch.Tensor],
                     config: TransformerConfig) -> dict[str, torch.Tensor]:
    """Our state dict in the Hub's names and Hugging Face's rotary layout (tests, tiny)."""
    out = {}
    for name, w in state.items():
        heads = _rotary_heads(name, config)
        if heads is not None:
            w = dense.native_to_hf_rotary(w, *heads)
        out[ours_to_hf(name)] = w.contiguous()
    return out


def hf_config_dict(config: TransformerConfig) -> dict[str, Any]:
    """The `config.json` of a Hugging Face copy: Llava (Pixtral 12B) without a patch merger,
    Mistral3 (Mistral Small 3.1) with one."""
    vision = config.vision
    assert vision is not None
    text = dense.hf_config_dict(dataclasses.replace(config, vision=None))
    for key in ("architectures", "bos_token_id", "eos_token_id"):
        text.pop(key)
    merged = vision.spatial_merge_size > 1
    if merged != vision.pre_norm or merged == vision.adapter_bias:
        raise ValueError("Hugging Face has two kinds of Pixtral: Llava (no patch merger, no "
                         "pre-norm, adapter biases) and Mistral3 (all the opposite)")
    arch = "Mistral3ForConditionalGeneration" if merged else "LlavaForConditionalGeneration"
    data: dict[str, Any] = {
        "architectures": [arch],
        "model_type": "mistral3" if merged else "llava",
        "text_config": text,
        "vision_config": {
            "model_type": "pixtral", "hidden_size": vision.dim,
            "intermediate_size": vision.hidden_dim, "num_hidden_layers": vision.n_layers,
            "num_attention_heads": vision.n_heads, "num_channels": vision.num_channels,
            "image_size": vision.image_size, "patch_size": vision.patch_size,
            "head_dim": vision.head_dim, "hidden_act": vision.activation,
            "rope_theta": vision.rope_theta,
            "rope_parameters": {"rope_type": "axial", "rope_theta": vision.rope_theta},
        },
        "image_token_index": vision.image_token_id,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -1,
        "multimodal_projector_bias": vision.adapter_bias,
        "tie_word_embeddings": config.tied_embeddings,
    }
    if merged:
        data["spatial_merge_size"] = vision.spatial_merge_size
    else:
        data["vision_feature_select_strategy"] = "full"
    return data


# ---------------------------------------------------------------------------------------------
# The family


class PixtralFamily:
    """Dense decoder + Pixtral vision tower: `params.json` with a `vision_encoder` block,
    `config.json` of `LlavaForConditionalGeneration` / `Mistral3ForConditionalGeneration`."""

    name = "Pixtral vision-language model"

    def claims(self, data: dict[str, Any], hf: bool) -> bool:
        if hf:
            return bool(set(data.get("architectures") or []) & set(HF_ARCHITECTURES))
        return data.get("model_type", "transformer") == "transformer" and \
            bool(data.get("vision_encoder"))

    def block_counts(self, data: dict[str, Any], hf: bool) -> list[BlockCount]:
        """The decoder's layers (and experts), as `dense`'s, and the vision encoder's layers."""
        if hf:
            text = data.get("text_config")
            vision = data.get("vision_config")
            counts = dense.FAMILY.block_counts(text if isinstance(text, dict) else {}, True)
            field, value = "vision_config.num_hidden_layers", (
                vision.get("num_hidden_layers") if isinstance(vision, dict) else None)
        else:
            counts = dense.FAMILY.block_counts(data, False)
            block = data.get("vision_encoder")
            field, value = "vision_encoder.num_hidden_layers", (
                block.get("num_hidden_layers") if isinstance(block, dict) else None)
        return [*counts, BlockCount(field, value, _VISION_LAYER, "vision encoder layers")]

    def parse_config(self, path: Path, hf: bool) -> TransformerConfig:
        return from_hf_config(path) if hf else from_params(path)

    def build(self, config: TransformerConfig) -> nn.Module:
        return Transformer(config)

    def rename(self, stored: str, hf: bool) -> str | None:
        return hf_to_ours(stored) if hf else native_to_ours(stored)

    def stored_name(self, ours: str, hf: bool) -> str:
        return ours_to_hf(ours) if hf else ours_to_native(ours)

    def tied(self, config: TransformerConfig) -> tuple[str, str] | None:
        return ("output.weight", "tok_embeddings.weight") if config.tied_embeddings else None

    def convert(self, ours: str, tensor: torch.Tensor, config: TransformerConfig,
                hf: bool) -> torch.Tensor:
        heads = _rotary_heads(ours, config) if hf else None
        return dense.hf_to_native_rotary(tensor, *heads) if heads else tensor

    def keeps_float32(self, ours: str) -> bool:
        return False

    def check_tokenizer(self, config: TransformerConfig, tokenizer: MistralTokenizer,
                        path: Path) -> None:
        """The tokenizer must cut images as the encoder expects: same patch and merge sizes,
        same `[IMG]` id. Otherwise the prompt's image tokens would not match the features."""
        vision = config.vision
        assert vision is not None
        encoder = getattr(tokenizer.instruct_tokenizer, "image_encoder", None)
        if encoder is None:
            raise ModelLoadError(path, "the tokenizer has no image settings (a vision model "
                                 "needs the tekken.json published with it, with its 'image' "
                                 "section)")
        image = encoder.image_config
        theirs = (image.image_patch_size, image.spatial_merge_size, encoder.special_ids.img)
        ours = (vision.patch_size, vision.spatial_merge_size, vision.image_token_id)
        if theirs != ours:
            raise ModelLoadError(
                path, f"the tokenizer cuts images into patches of {theirs[0]} pixels, merged "
                f"{theirs[1]}x{theirs[1]}, with [IMG] id {theirs[2]}; the vision encoder expects "
                f"{ours[0]}, {ours[1]}x{ours[1]} and id {ours[2]}")
        if image.max_image_size > vision.image_size:
            log.warning("%s: the tokenizer resizes images up to %d pixels, more than the "
                        "encoder's image_size %d", path, image.max_image_size, vision.image_size)


FAMILY = PixtralFamily()
