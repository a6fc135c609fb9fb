"""Prefill, decode loop, streaming iterator and stop rules.

One loop serves both entry points: `generate` runs a batch to the end, `stream` yields one
prompt's tokens and text as they come. Prefill is ragged: each chunk takes the next `chunk_size`
tokens of every row (shorter rows are padded with position -1, which the cache ignores), and each
row's logits are taken at its own last prompt token. Decoding then runs all rows in lock-step,
each at its own position; a row that reached EOS stops writing to the cache (position -1).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from ..cancel import CancellationToken
from ..checkpoints.tokenizer import TextStream
from ..errors import GenerationError
from ..images import DEFAULT_LIMITS, ImageLimits
from .image_inputs import RequestImages
from .prefix_cache import PrefixCache
from .sampling import SamplingParams, make_generator, sample, token_logprobs

if TYPE_CHECKING:
    from PIL import Image

    from ..model import Model

FinishReason = Literal["stop", "length", "cancelled"]

# Prompts longer than this are prefilled in chunks even when no chunk size is given: one-shot
# attention over a 100k-token prompt would need a (T, T) mask.
DEFAULT_MAX_CHUNK = 4096
# Prompts with at most this many tokens left to prefill go through the compiled decode step,
# one token at a time, when there is one (measured on a 200M model on 2 cores: one eager
# forward of 1-3 tokens ~60 ms, one compiled step ~18 ms).
FAST_PREFILL_TOKENS = 3


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
    # Prompt tokens taken from a prefix cache (not prefilled).
    cached_tokens: int = 0
    # Tokens run through the model: the prompt tokens prefilled (all of them unless cancelled
    # half-way) and the generated tokens fed back.
    computed_tokens: int = 0


@dataclass
class _Stats:
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    reasons: list[FinishReason] = field(default_factory=list)
    # How many tokens of each row the cache holds at the end (prompt then generated tokens fed
    # back): what a prefix cache may reuse next time.
    cached: list[int] = field(default_factory=list)
    images_encoded: int = 0


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
    cache: Any = None,
    start: int = 0,
    on_prefilled: Callable[[], None] | None = None,
    split_at: int | None = None,
    images: RequestImages | None = None,
) -> Iterator[tuple[list[int], list[float], list[bool]]]:
    """Yield, per decode step, each row's token, its log-prob, and whether the row emits it.

    `cache`, when given, already holds positions [0, start) of every prompt (a prefix cache's
    reuse): only the rest is prefilled. With `split_at`, a prefill chunk ends there and
    `on_prefilled` is called then (a recurrent state is snapshotted at that point); without it,
    `on_prefilled` is called after the whole prefill. Sets `stats.reasons` and `stats.cached`.
    `images`: the request's images; the vision tower runs once, before the prefill, and their
    features replace the embeddings of the `[IMG]` positions chunk by chunk.
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
    if not 0 <= start < min(lengths):
        raise GenerationError(f"start {start} must leave at least one prompt token to prefill")
    stats.cached = [start] * bsz
    if max_tokens == 0:
        stats.reasons = ["length"] * bsz
        return
    chunk = chunk_size or min(longest - start, DEFAULT_MAX_CHUNK)
    device = model.device
    decoder = model.decoder
    if cache is None:
        needed = longest + max_tokens
        if decoder is not None and decoder.batch_size == bsz and needed <= decoder.max_seq_len:
            cache = decoder.new_cache()
        else:
            cache = model.new_cache(bsz, needed)
    elif longest + max_tokens > cache.max_seq_len:
        max_tokens = cache.max_seq_len - longest
        if max_tokens <= 0:
            raise GenerationError(f"a prompt of {longest} tokens does not fit the cache of "
                                  f"{cache.max_seq_len} positions")
    fast = decoder is not None and decoder.accepts(cache)
    # A prefix cache often leaves a token or two to prefill: one compiled step per token is
    # cheaper than an eager forward for so few.
    stepwise = fast and longest - start <= FAST_PREFILL_TOKENS
    if images:
        stats.images_encoded = images.encode([start] * bsz)
        # the compiled step takes token ids only: image positions go through the eager forward
        stepwise = stepwise and not images.has_images_in(start, longest)
    if stepwise:
        chunk = 1
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
    begin = start
    while begin < longest:
        if cancelled():
            stats.reasons = ["cancelled"] * bsz
            stats.prefill_seconds = time.perf_counter() - t0
            return
        end = min(begin + chunk, longest)
        if split_at is not None and begin < split_at < end:
            end = split_at
        positions = torch.arange(begin, end, device=device).expand(bsz, -1)
        positions = torch.where(positions < lengths_t[:, None], positions, -1)
        ends_here = (lengths_t > begin) & (lengths_t <= end)
        out_index = (lengths_t - 1 - begin).clamp(0, end - begin - 1)
        if stepwise:
            assert decoder is not None
            logits = decoder.step(padded[:, begin], positions[:, 0], cache)
        else:
            logits = model.forward(padded[:, begin:end], positions, cache,
                                   output_index=out_index,
                                   embeddings=images.override(begin, end) if images else None)
        last_logits = torch.where(ends_here[:, None], logits, last_logits)
        stats.cached = [min(n, end) for n in lengths]
        if on_prefilled is not None and split_at is not None and end == split_at:
            on_prefilled()
        begin = end
    stats.prefill_seconds = time.perf_counter() - t0
    if on_prefilled is not None and split_at is None:
        on_prefilled()

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
        if fast:
            assert decoder is not None
            logits = decoder.step(next_tokens, positions[:, 0], cache)
        else:
            logits = model.forward(next_tokens[:, None], positions, cache,
                                   output_index=torch.zeros(bsz, dtype=torch.long, device=device))
        stats.cached = [n + 1 if a else n for n, a in zip(stats.cached, active, strict=True)]
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
    images: Sequence[Sequence[Image.Image]] | None = None,
    cancel: CancellationToken | None = None,
    image_limits: ImageLimits = DEFAULT_LIMITS,
) -> tuple[list[list[int]], list[list[float]]]:
    """Generate for a batch of prompts (token ids; unequal lengths allowed).

    Returns per prompt the generated ids (EOS not included; nothing after it) and the
    log-probability of each under the model. `eos_id=None` uses the tokenizer's EOS; pass -1 to
    never stop early. `chunk_size` bounds how many prompt tokens one prefill step takes.
    `images`: per prompt, the PIL images of its `[IMG]` tokens in their order (a vision model;
    the prompt as mistral-common encodes them), checked against `image_limits`.
    """
    _check_prompts(prompts, model.config.vocab_size)
    request_images = RequestImages(model, prompts, images, image_limits)
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                            top_k=top_k, seed=seed)
    out_tokens: list[list[int]] = [[] for _ in prompts]
    out_logprobs: list[list[float]] = [[] for _ in prompts]
    stats = _Stats()
    with torch.inference_mode():
        for tokens, logprobs, emit in _steps(model, prompts, params, _resolve_eos(model, eos_id),
                                             chunk_size, cancel, stats, images=request_images):
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
    prefix_cache: PrefixCache | None = None,
    cache_key: Hashable | None = None,
    images: Sequence[Image.Image] | None = None,
    image_limits: ImageLimits = DEFAULT_LIMITS,
) -> Generator[TokenEvent | EndEvent, None, None]:
    """Yield a `TokenEvent` per generated token as soon as it exists, then one `EndEvent`.

    `cancel` is checked between prefill chunks and between decode steps. With a `prefix_cache`
    and a `cache_key` (e.g. the document), the longest prefix that `cache_key`'s last request
    shares with `prompt` is reused instead of prefilled (`EndEvent.cached_tokens`); whatever
    this request computes, even if it is cancelled half-way, is kept for the next one.
    `images`: the PIL images of the prompt's `[IMG]` tokens, in order (see `generate`); the
    prefix cache tells images apart by content, not only by their tokens.
    """
    _check_prompts([prompt], model.config.vocab_size)
    request_images = RequestImages(model, [prompt], [images] if images else None, image_limits)
    cache_tokens = request_images.cache_tokens(0, prompt)
    params = sampling or SamplingParams()
    text = TextStream(model.tokenizer)
    stats = _Stats()
    generated: list[int] = []  # every sampled token (EOS included)
    emitted = 0
    lease = None
    if prefix_cache is not None and cache_key is not None:
        lease = prefix_cache.checkout(cache_key, cache_tokens,
                                      needed=len(prompt) + params.max_tokens)
    on_prefilled, split_at = None, None
    if lease is not None:
        # Where the cache wants its state saved for the next prompt (recurrent states, which
        # cannot be cut back), if anywhere.
        split_at = lease.cache.save_point(len(prompt))
        on_prefilled = lease.cache.save if split_at is not None else None
    try:
        with torch.inference_mode():
            for tokens, logprobs, emit in _steps(
                    model, [prompt], params, _resolve_eos(model, eos_id), chunk_size, cancel,
                    stats, cache=lease.cache if lease else None,
                    start=lease.reused if lease else 0, on_prefilled=on_prefilled,
                    split_at=split_at, images=request_images):
                generated.append(tokens[0])
                if emit[0]:
                    emitted += 1
                    yield TokenEvent(tokens[0], logprobs[0], text.push(tokens[0]))
    finally:
        if lease is not None and prefix_cache is not None:
            held = stats.cached[0] if stats.cached else lease.reused
            prefix_cache.checkin(lease, [*cache_tokens, *generated][:held])
    yield EndEvent(
        reason=stats.reasons[0] if stats.reasons else "length",
        prompt_tokens=stats.prompt_tokens,
        generated_tokens=emitted,
        prefill_seconds=stats.prefill_seconds,
        decode_seconds=stats.decode_seconds,
        text=text.flush(),
        cached_tokens=lease.reused if lease else 0,
        computed_tokens=(stats.cached[0] if stats.cached else 0) - (lease.reused if lease else 0),
    )
