"""Prefill, decode loop, streaming iterator and stop rules.

One loop serves both entry points: `generate` runs a batch to the end, `stream` yields one
prompt's tokens and text as they come. Prefill is ragged: each chunk takes the next `chunk_size`
tokens of every row (shorter rows are padded with position -1, which the cache ignores), and each
row's logits are taken at its own last prompt token. Decoding then runs all rows in lock-step,
each at its own position; a row that reached EOS stops writing to the cache (position -1).
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from .cancel import CancellationToken
from .errors import GenerationError
from .sampling import SamplingParams, make_generator, sample, token_logprobs
from .tokenizer import TextStream

if TYPE_CHECKING:
    from .model import Model

FinishReason = Literal["stop", "length", "cancelled"]

# Prompts longer than this are prefilled in chunks even when no chunk size is given: one-shot
# attention over a 100k-token prompt would need a (T, T) mask.
DEFAULT_MAX_CHUNK = 4096


@dataclass(frozen=True)
class TokenEvent:
    """One generated token; `text` is what it completes ("" in the middle of a character)."""

    token: int
    logprob: float
    text: str


@dataclass(frozen=True)
class EndEvent:
    """The last event of a stream."""

    reason: FinishReason
    prompt_tokens: int
    generated_tokens: int
    prefill_seconds: float
    decode_seconds: float
    text: str = ""  # bytes left at the end, flushed (an incomplete character as U+FFFD)


@dataclass
class _Stats:
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    reasons: list[FinishReason] = field(default_factory=list)


def _check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> None:
    if not prompts:
        raise GenerationError("no prompts given")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise GenerationError(f"prompt {i} is empty")
        bad = [t for t in p if not isinstance(t, int) or not 0 <= t < vocab_size]
        if bad:
            raise GenerationError(
                f"prompt {i} has token ids outside [0, {vocab_size}): {bad[:5]}"
            )


def _steps(
    model: Model,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    eos_id: int | None,
    chunk_size: int | None,
    cancel: CancellationToken | None,
    stats: _Stats,
) -> Iterator[tuple[list[int], list[float], list[bool]]]:
    """Yield, per decode step, each row's token, its log-prob, and whether the row emits it.

    Sets `stats.reasons` when done.
    """
    _check_prompts(prompts, model.config.vocab_size)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    bsz = len(prompts)
    lengths = [len(p) for p in prompts]
    longest = max(lengths)
    stats.prompt_tokens = sum(lengths)
    max_tokens = params.max_tokens
    context = model.config.max_position_embeddings
    if context:
        if longest >= context:
            raise GenerationError(
                f"a prompt of {longest} tokens leaves no room in the model's context of "
                f"{context} tokens")
        max_tokens = min(max_tokens, context - longest)
    if max_tokens == 0:
        stats.reasons = ["length"] * bsz
        return
    chunk = chunk_size or min(longest, DEFAULT_MAX_CHUNK)
    device = model.device
    cache = model.new_cache(bsz, longest + max_tokens)
    generator = make_generator(params, device)
    lengths_t = torch.tensor(lengths, device=device)
    padded = torch.zeros(bsz, longest, dtype=torch.long)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = torch.tensor(p, dtype=torch.long)
    padded = padded.to(device)

    def cancelled() -> bool:
        return cancel is not None and cancel.cancelled

    t0 = time.perf_counter()
    last_logits = torch.empty(bsz, model.config.vocab_size, device=device)
    for start in range(0, longest, chunk):
        if cancelled():
            stats.reasons = ["cancelled"] * bsz
            stats.prefill_seconds = time.perf_counter() - t0
            return
        end = min(start + chunk, longest)
        positions = torch.arange(start, end, device=device).expand(bsz, -1)
        positions = torch.where(positions < lengths_t[:, None], positions, -1)
        ends_here = (lengths_t > start) & (lengths_t <= end)
        out_index = (lengths_t - 1 - start).clamp(0, end - start - 1)
        logits = model.forward(padded[:, start:end], positions, cache, output_index=out_index)
        last_logits = torch.where(ends_here[:, None], logits, last_logits)
    stats.prefill_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    active = [True] * bsz
    reasons: list[FinishReason] = ["length"] * bsz
    logits = last_logits
    for step in range(max_tokens):
        next_tokens = sample(logits, params, generator)
        logprobs = token_logprobs(logits, next_tokens)
        tokens = next_tokens.tolist()
        emit = list(active)
        for i, tok in enumerate(tokens):
            if active[i] and eos_id is not None and tok == eos_id:
                active[i] = False
                emit[i] = False
                reasons[i] = "stop"
        yield tokens, logprobs.tolist(), emit
        if not any(active) or step == max_tokens - 1:
            break
        if cancelled():
            reasons = [r if not a else "cancelled" for r, a in zip(reasons, active, strict=True)]
            break
        positions = torch.tensor(
            [[lengths[i] + step] if active[i] else [-1] for i in range(bsz)], device=device
        )
        logits = model.forward(next_tokens[:, None], positions, cache,
                               output_index=torch.zeros(bsz, dtype=torch.long, device=device))
    stats.decode_seconds = time.perf_counter() - t0
    stats.reasons = reasons


def _resolve_eos(model: Model, eos_id: int | None) -> int | None:
    return model.eos_id if eos_id is None else eos_id


def generate(
    prompts: Sequence[Sequence[int]],
    model: Model,
    *,
    max_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_id: int | None = None,
    chunk_size: int | None = None,
    seed: int | None = None,
    images: Any = None,
    cancel: CancellationToken | None = None,
) -> tuple[list[list[int]], list[list[float]]]:
    """Generate for a batch of prompts (token ids; unequal lengths allowed).

    Returns per prompt the generated ids (EOS not included; nothing after it) and the
    log-probability of each under the model. `eos_id=None` uses the tokenizer's EOS; pass -1 to
    never stop early. `chunk_size` bounds how many prompt tokens one prefill step takes.
    """
    if images is not None and any(images):
        raise GenerationError("this model has no vision encoder: images are not supported")
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                            top_k=top_k, seed=seed)
    out_tokens: list[list[int]] = [[] for _ in prompts]
    out_logprobs: list[list[float]] = [[] for _ in prompts]
    stats = _Stats()
    with torch.inference_mode():
        for tokens, logprobs, emit in _steps(model, prompts, params, _resolve_eos(model, eos_id),
                                             chunk_size, cancel, stats):
            for i, keep in enumerate(emit):
                if keep:
                    out_tokens[i].append(tokens[i])
                    out_logprobs[i].append(logprobs[i])
    return out_tokens, out_logprobs


def stream(
    prompt: Sequence[int],
    model: Model,
    sampling: SamplingParams | None = None,
    *,
    cancel: CancellationToken | None = None,
    eos_id: int | None = None,
    chunk_size: int | None = None,
) -> Generator[TokenEvent | EndEvent, None, None]:
    """Yield a `TokenEvent` per generated token as soon as it exists, then one `EndEvent`.

    `cancel` is checked between prefill chunks and between decode steps.
    """
    params = sampling or SamplingParams()
    text = TextStream(model.tokenizer)
    stats = _Stats()
    generated = 0
    with torch.inference_mode():
        for tokens, logprobs, emit in _steps(model, [prompt], params, _resolve_eos(model, eos_id),
                                             chunk_size, cancel, stats):
            if emit[0]:
                generated += 1
                yield TokenEvent(tokens[0], logprobs[0], text.push(tokens[0]))
    yield EndEvent(
        reason=stats.reasons[0] if stats.reasons else "length",
        prompt_tokens=stats.prompt_tokens,
        generated_tokens=generated,
        prefill_seconds=stats.prefill_seconds,
        decode_seconds=stats.decode_seconds,
        text=text.flush(),
    )
