"""Checkpoint folder -> `Model`. Weight names are translated here and nowhere else.

Native Mistral folders (`params.json` + `consolidated*.safetensors` + tokenizer) load as they
are: our module names are the native keys. Hugging Face folders (`config.json` +
`model*.safetensors`) are renamed, and their q/k rows permuted from HF's rotate-half layout to
the native interleaved one. Pickle checkpoints are refused, never unpickled.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from . import config as config_mod
from .config import TransformerConfig
from .errors import ModelLoadError
from .model import Model
from .tokenizer import find_tokenizer_file, load_tokenizer
from .transformer import Transformer

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
SAFETENSORS_DTYPES = {
    "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
               "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}

# Architecture registry: name -> builder of an empty (meta-device) module from its config.
ARCHITECTURES: dict[str, Callable[[TransformerConfig], nn.Module]] = {
    "transformer": Transformer,
}


# ---------------------------------------------------------------------------------------------
# Hugging Face <-> native names and rotary layout

_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_HF_TO_NATIVE_LAYER = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_HF_TO_NATIVE_TOP = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_NATIVE_TO_HF_LAYER = {v: k for k, v in _HF_TO_NATIVE_LAYER.items()}
_NATIVE_TO_HF_TOP = {v: k for k, v in _HF_TO_NATIVE_TOP.items()}
# Mixtral (MoE): the same names under another prefix, in the layout Mixtral's Hugging Face
# repositories use (one tensor per expert, as transformers' legacy MixtralForCausalLM saved).
_HF_MOE = re.compile(r"^block_sparse_moe\.(gate\.weight|experts\.\d+\.w[123]\.weight)$")
_NATIVE_MOE = re.compile(r"^feed_forward\.(gate\.weight|experts\.\d+\.w[123]\.weight)$")


def hf_to_native_name(name: str) -> str | None:
    if name in _HF_TO_NATIVE_TOP:
        return _HF_TO_NATIVE_TOP[name]
    m = _HF_LAYER.match(name)
    if m and m.group(2) in _HF_TO_NATIVE_LAYER:
        return f"layers.{m.group(1)}.{_HF_TO_NATIVE_LAYER[m.group(2)]}"
    moe = _HF_MOE.match(m.group(2)) if m else None
    if m and moe:
        return f"layers.{m.group(1)}.feed_forward.{moe.group(1)}"
    return None


def native_to_hf_name(name: str) -> str:
    if name in _NATIVE_TO_HF_TOP:
        return _NATIVE_TO_HF_TOP[name]
    layer, rest = name.split(".", 2)[1:]
    moe = _NATIVE_MOE.match(rest)
    if moe:
        return f"model.layers.{layer}.block_sparse_moe.{moe.group(1)}"
    return f"model.layers.{layer}.{_NATIVE_TO_HF_LAYER[rest]}"


def hf_to_native_rotary(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """q/k rows from HF's rotate-half order to the native adjacent-pairs order."""
    return w.view(n_heads, 2, head_dim // 2, -1).transpose(1, 2).reshape(n_heads * head_dim, -1)


def native_to_hf_rotary(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    return w.view(n_heads, head_dim // 2, 2, -1).transpose(1, 2).reshape(n_heads * head_dim, -1)


def _rotary_heads(native_name: str, config: TransformerConfig) -> int | None:
    if native_name.endswith("attention.wq.weight"):
        return config.n_heads
    if native_name.endswith("attention.wk.weight"):
        return config.n_kv_heads
    return None


def state_dict_to_hf(state: dict[str, torch.Tensor],
                     config: TransformerConfig) -> dict[str, torch.Tensor]:
    """A native state dict in Hugging Face names and rotary layout (for export and tests)."""
    out = {}
    for name, w in state.items():
        heads = _rotary_heads(name, config)
        out[native_to_hf_name(name)] = (
            native_to_hf_rotary(w, heads, config.head_dim) if heads else w
        ).contiguous()
    return out


def hf_config_dict(config: TransformerConfig) -> dict[str, object]:
    """The `config.json` of a Hugging Face copy of a model with this config."""
    windows = set(config.sliding_windows)
    if len(windows) > 1:
        raise ValueError("Hugging Face's Mistral config has one sliding window for all layers")
    moe: dict[str, object] = {}
    if config.moe is not None:
        moe = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
               "num_local_experts": config.moe.num_experts,
               "num_experts_per_tok": config.moe.num_experts_per_tok,
               "router_jitter_noise": 0.0, "output_router_logits": False}
    return {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "hidden_size": config.dim,
        "intermediate_size": config.hidden_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings or 32768,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "sliding_window": windows.pop(),
        "tie_word_embeddings": config.tied_embeddings,
        "vocab_size": config.vocab_size,
        "bos_token_id": 1,
        "eos_token_id": 2,
        **moe,
    }


# ---------------------------------------------------------------------------------------------
# safetensors files


def read_safetensors_header(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Names, dtypes and shapes of a safetensors file, checking it is complete.

    Reading the header ourselves gives exact messages for truncated or foreign files (the
    library would only fail later, or with a generic error).
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ModelLoadError(path, f"not a safetensors file ({size} bytes, truncated?)")
            header_len = int.from_bytes(prefix, "little")
            if header_len > size - 8:
                raise ModelLoadError(
                    path, f"truncated or not a safetensors file: the header claims {header_len} "
                    f"bytes but the file has {size}")
            header = json.loads(f.read(header_len))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(path, f"unreadable safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ModelLoadError(path, "unreadable safetensors header")
    header.pop("__metadata__", None)
    tensors = {}
    data_end = 0
    for name, info in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            data_end = max(data_end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError):
            raise ModelLoadError(path, f"bad header entry for tensor {name!r}") from None
        tensors[name] = (dtype, shape)
    if 8 + header_len + data_end > size:
        raise ModelLoadError(
            path, f"truncated: its tensors need {8 + header_len + data_end} bytes, the file "
            f"has {size} (re-download it)")
    return tensors


def _check_not_pickle(path: Path) -> None:
    if path.suffix in PICKLE_SUFFIXES:
        raise ModelLoadError(
            path, "pickle checkpoints are refused (loading one can run arbitrary code); use the "
            "model's .safetensors files")


def _native_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("consolidated*.safetensors"))
    if not files:
        pickles = [p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            _check_not_pickle(pickles[0])
        raise ModelLoadError(folder, "no consolidated.safetensors next to params.json")
    return files


def _hf_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        data = config_mod.read_json(index)
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(index, "no weight_map")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.exists():
                raise ModelLoadError(f, f"listed in {index.name} but missing")
        return files
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        pickles = [p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            _check_not_pickle(pickles[0])
        raise ModelLoadError(folder, "no model.safetensors next to config.json")
    return files


def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype in DTYPE_NAMES:
        return DTYPE_NAMES[dtype]
    raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_NAMES)}")


# ---------------------------------------------------------------------------------------------
# The loader


# native name -> (file, stored name, shape, dtype)
TensorIndex = dict[str, tuple[Path, str, tuple[int, ...], torch.dtype]]


def _index_tensors(files: Iterable[Path], rename: Callable[[str], str | None],
                   kind: str = "Mistral dense transformer") -> TensorIndex:
    """Where each weight is, from the files' headers only (no tensor is read); `rename` maps a
    stored name to ours, or to None for a tensor that is not a `kind` weight."""
    index: TensorIndex = {}
    for f in files:
        for stored, (dtype, shape) in read_safetensors_header(f).items():
            native = rename(stored)
            if native is None:
                raise ModelLoadError(f, f"unexpected tensor {stored!r} (not a {kind} weight)")
            index[native] = (f, stored, shape, dtype)
    return index


def _is_mamba_hf(path: Path) -> bool:
    from .mamba2_loading import is_mamba_hf_config

    return is_mamba_hf_config(config_mod.read_json(path))


def _load_mamba(folder: Path, *, hf: bool, device: str | torch.device,
                dtype: torch.dtype | None) -> Model:
    # Imported here: mamba2_loading builds on this module's file helpers.
    from .mamba2_loading import load_mamba

    return load_mamba(folder, hf=hf, device=device, dtype=dtype)


def check_tensors(index: TensorIndex, expected: dict[str, tuple[int, ...]], first_file: Path, *,
                  stored_name: Callable[[str], str] = lambda name: name,
                  unexpected_hint: str = "") -> None:
    """Every expected tensor is stored with its shape, and nothing else is: otherwise a
    `ModelLoadError` naming the file and the tensor (as `stored_name` spells it)."""
    for name, shape in expected.items():
        if name not in index:
            raise ModelLoadError(first_file, f"missing tensor {stored_name(name)!r}")
        f, stored, got, _ = index[name]
        if got != shape:
            raise ModelLoadError(f, f"tensor {stored!r} has shape {list(got)}, the config "
                                 f"implies {list(shape)}")
    extra = sorted(set(index) - set(expected))
    if extra:
        f, stored, _, _ = index[extra[0]]
        raise ModelLoadError(f, f"unexpected tensor {stored!r}{unexpected_hint}")


def load(path: str | Path, device: str | torch.device = "cpu",
         dtype: str | torch.dtype | None = None) -> Model:
    """Load a native Mistral or Hugging Face checkpoint folder."""
    folder = Path(path).expanduser()
    target_dtype = _parse_dtype(dtype)
    if folder.is_file():
        _check_not_pickle(folder)
        raise ModelLoadError(folder, "expected a model folder, got a file")
    if not folder.is_dir():
        raise ModelLoadError(folder, "model folder not found")

    if (folder / "params.json").exists():
        params_path = folder / "params.json"
        raw = config_mod.read_json(params_path)
        for family in ("vision_encoder",):
            if raw.get(family):
                raise ModelLoadError(params_path, f"{family!r} checkpoints are not supported yet")
        if raw.get("model_type") == "mamba":  # Mamba2: engine/mamba2_loading.py
            return _load_mamba(folder, hf=False, device=device, dtype=target_dtype)
        if raw.get("model_type", "transformer") != "transformer":
            raise ModelLoadError(params_path,
                                 f"model_type {raw['model_type']!r} is not supported yet")
        config = config_mod.from_params(params_path)
        files = _native_files(folder)
        hf = False
    elif (folder / "config.json").exists():
        if _is_mamba_hf(folder / "config.json"):
            return _load_mamba(folder, hf=True, device=device, dtype=target_dtype)
        config = config_mod.from_hf_config(folder / "config.json")
        files = _hf_files(folder)
        hf = True
    else:
        raise ModelLoadError(folder, "neither params.json (native Mistral) nor config.json "
                             "(Hugging Face) found")
    tokenizer = load_tokenizer(find_tokenizer_file(folder))
    index = _index_tensors(files, hf_to_native_name if hf else (lambda n: n))

    with torch.device("meta"):
        module = ARCHITECTURES["transformer"](config)
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    if config.tied_embeddings:
        index.pop("output.weight", None)
        del expected["output.weight"]
    check_tensors(index, expected, files[0])

    float_dtypes = [d for (_, _, _, d) in index.values() if d.is_floating_point]
    target_dtype = target_dtype or (float_dtypes[0] if float_dtypes else torch.float32)
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as handle:
                for native, (src, stored, _, _) in index.items():
                    if src != f:
                        continue
                    w = handle.get_tensor(stored)
                    heads = _rotary_heads(native, config) if hf else None
                    if heads:
                        w = hf_to_native_rotary(w, heads, config.head_dim)
                    state[native] = w.to(device=device, dtype=target_dtype).contiguous()
        except SafetensorError as e:
            raise ModelLoadError(f, f"cannot read tensors ({e})") from None
    if config.tied_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    module.load_state_dict(state, assign=True, strict=True)
    module.eval().requires_grad_(False)
    log.info("loaded %s (%s layout, %s, %s)", folder, "hf" if hf else "native", target_dtype,
             device)
    return Model(module, config, tokenizer, folder)
