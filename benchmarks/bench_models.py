"""The random models the benchmarks run, one per architecture, each written once in both layouts
(native for us, Hugging Face for transformers: the same weights).

- dense: a ~200M Mistral (dim 1024, 12 layers, 16 heads / 4 kv heads, head_dim 64, hidden
  3072, vocab 32768).
- moe: the same model with every feed-forward a Mixtral mixture of 8 experts, top-2, each expert
  of hidden size 1536: the two experts a token runs hold as many weights as the dense model's
  one feed-forward of 3072, so a decode token reads and computes what the dense one does
  (~212M active parameters), out of ~552M in all (2.2 GB per layout in float32).
- mamba2: a ~200M Mamba2 with the reference layer (d_state 128, head_dim 64, expand 2, conv 4,
  chunks of 256) and Codestral Mamba's 8 groups: dim 1024, 16 layers, 32 heads, vocab 32768.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.arch.config import MambaConfig, TransformerConfig
from engine.checkpoints.mamba2 import random_mamba_state_dict
from engine.checkpoints.tiny import (
    random_state_dict,
    tiny_config,
    tiny_mamba_config,
    write_checkpoint,
)

TOKENIZER = "v3"
SEED = 0
SHAPE = dict(dim=1024, n_layers=12, n_heads=16, n_kv_heads=4, head_dim=64, hidden_dim=3072)
MOE_SHAPE = dict(SHAPE, hidden_dim=1536)
MOE = (8, 2)  # experts, experts per token
MAMBA_SHAPE = dict(dim=1024, n_layers=16, n_groups=8, d_state=128, head_dim=64, expand=2,
                   d_conv=4, chunk_size=256)
# Parameters a decode token does not read in full: a gather of one row.
EMBEDDINGS = ("tok_embeddings.weight", "embed_tokens.weight", "backbone.embedding.weight")


@dataclass(frozen=True)
class Arch:
    name: str  # as in --archs
    title: str  # in the table headers
    hf_class: str  # what transformers must load the Hugging Face copy as
    subdir: str  # under the model directory ("" for dense: where it always was)
    config: Callable[[], TransformerConfig | MambaConfig]
    state: Callable[[Any, int], dict[str, torch.Tensor]]  # (config, seed) -> float32 weights


ARCHS = {
    "dense": Arch("dense", "Mistral", "MistralForCausalLM", "",
                  lambda: tiny_config(TOKENIZER, **SHAPE),  # type: ignore[arg-type]
                  random_state_dict),
    "moe": Arch("moe", f"Mixtral, {MOE[0]} experts top-{MOE[1]}", "MixtralForCausalLM", "moe",
                lambda: tiny_config(TOKENIZER, **MOE_SHAPE, moe=MOE),  # type: ignore[arg-type]
                random_state_dict),
    "mamba2": Arch("mamba2", "Mamba2", "Mamba2ForCausalLM", "mamba2",
                   lambda: tiny_mamba_config(TOKENIZER, **MAMBA_SHAPE),  # type: ignore[arg-type]
                   random_mamba_state_dict),
}


def ensure_checkpoints(root: Path, arch: str = "dense") -> tuple[Path, Path]:
    """Write (once) the random model of `arch` in both layouts under `root`; return (native, hf).

    The dense model lives in `root/native` and `root/hf` (as edit_trace.py expects), the others
    in `root/<arch>/native` and `root/<arch>/hf`.
    """
    spec = ARCHS[arch]
    folder = root / spec.subdir if spec.subdir else root
    native, hf = folder / "native", folder / "hf"
    if not (native / "consolidated.safetensors").exists() or \
            not (hf / "model.safetensors").exists():
        t0 = time.perf_counter()
        config = spec.config()
        state = spec.state(config, SEED)
        write_checkpoint(native, config, state, layout="native", tokenizer=TOKENIZER)
        write_checkpoint(hf, config, state, layout="hf", tokenizer=TOKENIZER)
        label = "" if arch == "dense" else f"{arch} "
        print(f"wrote the random {label}model to {folder} in {time.perf_counter() - t0:.1f}s")
    return native, hf


@contextlib.contextmanager
def model_root(model_dir: str | None) -> Iterator[Path]:
    if model_dir:
        path = Path(model_dir)
        path.mkdir(parents=True, exist_ok=True)
        yield path
    else:
        with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
            yield Path(tmp)


def _active_share(name: str, config: TransformerConfig | MambaConfig | None) -> float:
    """The share of a parameter one token uses: k/E for an expert's weights, else 1."""
    moe = getattr(config, "moe", None)
    if moe is not None and ".experts." in name:
        return float(moe.num_experts_per_tok / moe.num_experts)
    return 1.0


def active_parameters(module: torch.nn.Module,
                      config: TransformerConfig | MambaConfig | None = None) -> int:
    """Parameters one token runs through (all of them, but only k of E experts)."""
    return round(sum(p.numel() * _active_share(n, config) for n, p in module.named_parameters()))


def decode_weight_bytes(module: torch.nn.Module,
                        config: TransformerConfig | MambaConfig | None = None) -> int:
    """Bytes of weights one decode step reads: every parameter except the embedding table, and
    of a mixture of experts only the k experts the token goes to (k/E of the expert weights)."""
    return round(sum(p.numel() * p.element_size() * _active_share(name, config)
                     for name, p in module.named_parameters() if not name.endswith(EMBEDDINGS)))
