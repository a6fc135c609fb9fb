"""The phases of running a model, as separate functions over one `Cache` (as gpt-fast separates
its prefill and decode): the generation loop composes them, and a faster implementation of a
phase plugs in here without the loop knowing.

- `prefill`: a chunk of prompt tokens per row (rows of unequal lengths padded with position
  -1), the logits of one chosen position per row;
- `decode_one`: one token per row, through the model's compiled step (`model.decoder`) when it
  accepts the cache's geometry, else the eager forward; `decode_greedy`, the same with greedy
  sampling done in the native step (no logits to Python);
- `verify`: k tokens per row in one pass, the logits at every position: what speculative
  decoding checks drafted tokens with (then `cache.keep(n)` cuts back to the accepted ones);
  `verify_greedy`, the same with greedy sampling at every position in the native step.

Every function writes the new tokens' keys/values (or state) into the cache. Positions are
absolute; -1 marks padding, which changes nothing any other row sees.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..arch.cache import Cache
from ..arch.transformer import EmbeddingOverride

if TYPE_CHECKING:
    from ..model import Model


def prefill(model: Model, tokens: torch.Tensor, positions: torch.Tensor, cache: Cache,
            output_index: torch.Tensor,
            embeddings: EmbeddingOverride | None = None) -> torch.Tensor:
    """Run `tokens: (B, T)` at `positions: (B, T)`; float32 logits `(B, V)` at
    `output_index: (B,)` (each row's last prompt token in the chunk, typically). `embeddings`
    replaces some positions' token embeddings (image features at `[IMG]` positions).

    A chunk of a few tokens (a keystroke's) goes through the native step when the model has
    one for this cache (`FastDecoder.prefill`: one call, the weights streamed once)."""
    step = model.decoder
    if (embeddings is None and step is not None and tokens.shape[1] <= step.chunk_tokens
            and uses_fast_step(model, cache)):
        return step.prefill(tokens, positions, cache, output_index)
    return model.forward(tokens, positions, cache, output_index=output_index,
                         embeddings=embeddings)


def decode_one(model: Model, tokens: torch.Tensor, positions: torch.Tensor,
               cache: Cache) -> torch.Tensor:
    """One token per row, `tokens: (B,)` at `positions: (B,)`; float32 logits `(B, V)`."""
    step = model.decoder
    if step is not None and uses_fast_step(model, cache):
        return step.step(tokens, positions, cache)
    zeros = torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
    return model.forward(tokens[:, None], positions[:, None], cache, output_index=zeros)


def decode_greedy(model: Model, tokens: torch.Tensor, positions: torch.Tensor,
                  cache: Cache) -> tuple[list[int], list[float]] | None:
    """`decode_one` followed by greedy sampling, in one native call where the model's step
    has one (each row's next token and its log-probability); None otherwise (then
    `decode_one` and `sampling` do it)."""
    step = model.decoder
    if step is None or not uses_fast_step(model, cache):
        return None
    return step.greedy(tokens, positions, cache)


def verify(model: Model, tokens: torch.Tensor, positions: torch.Tensor,
           cache: Cache) -> torch.Tensor:
    """`tokens: (B, k)` at `positions: (B, k)` in one pass; float32 logits `(B, k, V)`, those at
    position i predicting the token after `tokens[:, i]`."""
    return model.forward(tokens, positions, cache)


def verify_greedy(model: Model, tokens: torch.Tensor, positions: torch.Tensor,
                  cache: Cache) -> tuple[list[int], list[float]] | None:
    """`verify` with greedy sampling at every position, in one native call where the model's
    step has one and takes `tokens: (B, T)` (T up to its `chunk_tokens`): the greedy token and
    its log-probability after each token, row-major (B * T each); None otherwise."""
    step = model.decoder
    if step is None or not uses_fast_step(model, cache) or \
            not 1 <= tokens.shape[1] <= step.chunk_tokens:
        return None
    return step.verify(tokens, positions, cache)


def uses_fast_step(model: Model, cache: Cache) -> bool:
    """Whether `decode_one` takes the compiled step for this cache: it has the step's geometry,
    and no LoRA adapter is active on this thread (a per-thread choice a compiled graph cannot
    see)."""
    return (model.decoder is not None and model.decoder.accepts(cache)
            and model.active_lora is None)
