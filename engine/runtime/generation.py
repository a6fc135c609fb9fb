"""The generation loop: `Generation` advances a batch one unit of work at a time (a prefill chunk
or a decode step); `generate` runs it to the end, `stream` yields one prompt's tokens and text as
they come.

Prefill is ragged: each chunk takes the next `chunk_size` tokens of every row (shorter rows are
padded with position -1, which the cache ignores), and each row's logits are taken at its own
last prompt token. Decoding then runs all rows in lock-step, each at its own position; a row that
reached EOS stops writing to the cache (position -1). The phases themselves are `phases.py`'s.

Why units of work: a caller that serves several requests on one thread (the language server's
scheduler) can run another request between two prefill chunks or two decode steps of this one,
and resume it later with its cache intact (`Stream.step`).

Images (a vision model): the first unit of work runs the vision tower, once, on every image of
the request whose `[IMG]` positions are still to be prefilled; each prefill chunk then replaces
the embeddings of its `[IMG]` positions with their features (`image_inputs.RequestImages`).
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from ..arch.cache import Cache
from ..cancel import CancellationToken
from ..checkpoints.tokenizer import TextStream
from ..errors import GenerationError
from ..images import DEFAULT_LIMITS, ImageLimits
from .image_inputs import RequestImages
from .lookup import Drafter, policy_for
from .phases import decode_greedy, decode_one, prefill, uses_fast_step, verify_greedy
from .prefix_cache import Lease, PrefixCache
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
    # Speculative decoding by lookup (`Stream(lookup=)`): tokens drafted, and those the model
    # agreed with (each one a pass over the weights saved).
    drafted_tokens: int = 0
    accepted_tokens: int = 0


@dataclass(frozen=True)
class Decoded:
    """One decode step of a batch: each row's token, its log-prob, and whether the row emits it
    (False for EOS and for rows that had already stopped)."""

    tokens: list[int]
    logprobs: list[float]
    emit: list[bool]


@dataclass
class Stats:
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    reasons: list[FinishReason] = field(default_factory=list)
    # How many tokens of each row the cache holds (prompt then generated tokens fed back): what
    # a prefix cache may reuse next time.
    cached: list[int] = field(default_factory=list)
    images_encoded: int = 0  # images the vision tower ran on (not those a prefix cache held)
    # Speculative decoding by lookup (`drafter`): tokens drafted, and those the model agreed with.
    drafted: int = 0
    accepted: int = 0


def _check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> None:
    if not prompts:
        raise GenerationError("no prompts given")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise GenerationError(f"prompt {i} is empty")
        # Every keystroke checks a ~2k-token prompt: the types, the smallest and the largest in
        # C loops (a Python loop over the tokens took ~0.3 ms).
        if all(issubclass(t, int) for t in set(map(type, p))) and \
                min(p) >= 0 and max(p) < vocab_size:
            continue
        bad = [t for t in p if not isinstance(t, int) or not 0 <= t < vocab_size]
        raise GenerationError(f"prompt {i} has token ids outside [0, {vocab_size}): {bad[:5]}")


class Generation:
    """A batch of prompts being generated, one `advance()` at a time.

    `cache`, when given, already holds positions [0, start) of every prompt (a prefix cache's
    reuse): only the rest is prefilled. With `save`, the cache's `save_point` splits the prefill
    and `cache.save()` runs there (a recurrent state is copied for the next prompt). `images`:
    the prompts' images, checked against them (`RequestImages`); encoding them is the first
    unit of work.

    `drafter` with `lookup` > 0 (one prompt, greedy sampling, the native step): each decode step
    checks up to `lookup` drafted tokens in the same pass (`lookup.py`; the decode step's
    `DraftPolicy` says how many pay, from what passes cost and how often drafts are taken,
    measured as they run), and the tokens it
    agreed with come out of the next `advance()` calls without running the model. The tokens
    and log-probabilities are those of decoding without drafts.
    """

    def __init__(self, model: Model, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 *, eos_id: int | None = None, chunk_size: int | None = None,
                 cancel: CancellationToken | None = None, cache: Cache | None = None,
                 start: int = 0, save: bool = False,
                 images: RequestImages | None = None, drafter: Drafter | None = None,
                 lookup: int = 0) -> None:
        _check_prompts(prompts, model.config.vocab_size)
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        self.model = model
        self.params = params
        self.eos_id = model.eos_id if eos_id is None else eos_id
        self.cancel = cancel
        bsz = len(prompts)
        self.lengths = [len(p) for p in prompts]
        longest = max(self.lengths)
        self.stats = Stats(prompt_tokens=sum(self.lengths), cached=[start] * bsz)
        max_tokens = params.max_tokens
        context = model.config.max_position_embeddings
        if context:
            if longest >= context:
                raise GenerationError(
                    f"a prompt of {longest} tokens leaves no room in the model's context of "
                    f"{context} tokens")
            max_tokens = min(max_tokens, context - longest)
        if not 0 <= start < min(self.lengths):
            raise GenerationError(f"start {start} must leave at least one prompt token to "
                                  "prefill")
        if cache is None:
            needed = longest + max_tokens
            step = model.decoder
            if step is not None and step.batch_size == bsz and needed <= step.max_seq_len:
                cache = step.new_cache()
            else:
                cache = model.new_cache(bsz, needed)
        elif longest + max_tokens > cache.max_seq_len:
            max_tokens = cache.max_seq_len - longest
            if max_tokens <= 0:
                raise GenerationError(f"a prompt of {longest} tokens does not fit the cache of "
                                      f"{cache.max_seq_len} positions")
        assert cache is not None
        self.cache: Cache = cache
        self.max_tokens = max_tokens
        self.done = max_tokens == 0
        if self.done:
            self.stats.reasons = ["length"] * bsz
        self.chunk = chunk_size or min(longest - start, DEFAULT_MAX_CHUNK)
        # A prefix cache often leaves a token or two to prefill: one compiled step per token is
        # cheaper than an eager forward for so few.
        # The native step takes them all in one call instead (`phases.prefill`).
        fast = uses_fast_step(model, cache)
        chunk_tokens = model.decoder.chunk_tokens if fast and model.decoder else 0
        self.stepwise = (fast and longest - start <= FAST_PREFILL_TOKENS
                         and (longest - start > chunk_tokens or self.chunk < longest - start))
        self.images = images if images else None
        self.images_pending = self.images is not None and not self.done
        if self.images is not None:  # the compiled step takes token ids, not embeddings
            self.stepwise = self.stepwise and not self.images.has_images_in(start, longest)
        if self.stepwise:
            self.chunk = 1
        self.save_at = cache.save_point(longest) if save else None
        device = model.device
        self.generator = make_generator(params, device)
        self.lengths_t = torch.tensor(self.lengths, device=device)
        padded = torch.zeros(bsz, longest, dtype=torch.long)
        for i, p in enumerate(prompts):
            padded[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        self.padded = padded.to(device)
        self.longest = longest
        self.begin = start  # the next prompt position to prefill
        self.logits = torch.empty(bsz, model.config.vocab_size, device=device)
        self.active = [True] * bsz
        self.reasons: list[FinishReason] = ["length"] * bsz
        self.steps = 0  # tokens sampled per row so far
        self.last: torch.Tensor | None = None  # the tokens sampled last, to feed back
        if lookup < 0:
            raise ValueError(f"lookup must be >= 0, got {lookup}")
        self.drafter = drafter if lookup and bsz == 1 and params.greedy else None
        self.lookup = lookup
        self.generated: list[int] = []  # the one row's tokens so far (what drafts follow)
        self._agreed: deque[tuple[int, float]] = deque()  # drafts verified, not yet emitted

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    def _cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.cancelled

    def advance(self) -> Decoded | None:
        """Run the next unit of work: a prefill chunk (None, unless it was the last one: then
        the first tokens are sampled from it) or a decode step (the tokens it sampled). Checks
        the cancellation token first. Returns None once `done`."""
        if self.done:
            return None
        if self._cancelled():
            if self.begin < self.longest:
                self.stats.reasons = ["cancelled"] * self.batch_size
            else:
                self.stats.reasons = [r if not a else "cancelled"
                                      for r, a in zip(self.reasons, self.active, strict=True)]
            self.done = True
            return None
        t0 = time.perf_counter()
        if self.images_pending:
            assert self.images is not None
            self.images_pending = False
            self.stats.images_encoded = self.images.encode([self.begin] * self.batch_size)
            self.stats.prefill_seconds += time.perf_counter() - t0
            return None
        if self.begin < self.longest:
            self._prefill_chunk()
            self.stats.prefill_seconds += time.perf_counter() - t0
            if self.begin < self.longest:
                return None
            t0 = time.perf_counter()  # the first tokens' sampling counts as decoding
            decoded = self._sample()
            self.stats.decode_seconds += time.perf_counter() - t0
            return decoded
        if self._agreed:  # computed by the last step already
            token, logprob = self._agreed.popleft()
            return self._emit([token], [logprob])
        assert self.last is not None
        positions = torch.tensor(
            [self.lengths[i] + self.steps - 1 if self.active[i] else -1
             for i in range(self.batch_size)], device=self.padded.device)
        picked = self._speculate() if self.drafter is not None else None
        if picked is None and self.params.greedy:
            started = time.perf_counter()
            picked = decode_greedy(self.model, self.last, positions, self.cache)
            if picked is not None and self.drafter is not None:  # what a draft is measured by
                policy_for(self.model.decoder).measured(1, time.perf_counter() - started)
        if picked is None:
            self.logits = decode_one(self.model, self.last, positions, self.cache)
        self.stats.cached = [n + 1 if a else n
                             for n, a in zip(self.stats.cached, self.active, strict=True)]
        decoded = self._sample() if picked is None else self._emit(*picked)
        self.stats.decode_seconds += time.perf_counter() - t0
        return decoded

    def _speculate(self) -> tuple[list[int], list[float]] | None:
        """One pass over the last token and a draft of what follows it: the model's next
        token, with the drafted tokens it agreed with queued after it (`_agreed`). None when
        there is no draft or no native step to check it in one pass."""
        assert self.drafter is not None and self.last is not None
        step = self.model.decoder
        if step is None or not uses_fast_step(self.model, self.cache):
            return None
        # every drafted token checked, and the model's own after them, must fit the request
        room = min(self.lookup, step.chunk_tokens - 1, self.max_tokens - self.steps - 1)
        draft = self.drafter.draft(self.generated, room) if room > 0 else []
        if not draft:
            return None
        policy = policy_for(step)
        matched = self.drafter.matched
        draft = draft[:policy.length(len(draft), matched)]
        if not draft:
            return None
        started = time.perf_counter()
        at = self.lengths[0] + self.steps - 1
        device = self.padded.device
        tokens = torch.tensor([[int(self.last[0]), *draft]], device=device)
        positions = torch.arange(at, at + len(draft) + 1, device=device)[None]
        checked = verify_greedy(self.model, tokens, positions, self.cache)
        if checked is None:
            return None
        policy.measured(len(draft) + 1, time.perf_counter() - started)
        ids, logprobs = checked
        agreed = 0
        while agreed < len(draft) and draft[agreed] == ids[agreed]:
            agreed += 1
        if agreed < len(draft):
            # forget the keys of the drafts after the first the model disagreed with
            kept = self.cache.keep(at + agreed + 1)
            if kept != at + agreed + 1:
                raise GenerationError(f"the cache could not cut back to {at + agreed + 1} "
                                      f"positions after a draft (kept {kept})")
        policy.checked(matched, len(draft), agreed)
        self.stats.drafted += len(draft)
        self.stats.accepted += agreed
        self.stats.cached[0] += agreed  # the step's bookkeeping counts the last token's
        self._agreed.extend(zip(ids[1:agreed + 1], logprobs[1:agreed + 1], strict=True))
        return ids[:1], logprobs[:1]

    def _prefill_chunk(self) -> None:
        begin = self.begin
        end = min(begin + self.chunk, self.longest)
        if self.save_at is not None and begin < self.save_at < end:
            end = self.save_at
        bsz = self.batch_size
        positions = torch.arange(begin, end, device=self.padded.device).expand(bsz, -1)
        positions = torch.where(positions < self.lengths_t[:, None], positions, -1)
        ends_here = (self.lengths_t > begin) & (self.lengths_t <= end)
        if self.stepwise:
            logits = decode_one(self.model, self.padded[:, begin], positions[:, 0], self.cache)
        else:
            out_index = (self.lengths_t - 1 - begin).clamp(0, end - begin - 1)
            logits = prefill(self.model, self.padded[:, begin:end], positions, self.cache,
                             out_index,
                             self.images.override(begin, end) if self.images else None)
        self.logits = torch.where(ends_here[:, None], logits, self.logits)
        self.stats.cached = [min(n, end) for n in self.lengths]
        if self.save_at is not None and end == self.save_at:
            self.cache.save()
        self.begin = end

    def _sample(self) -> Decoded:
        next_tokens = sample(self.logits, self.params, self.generator)
        logprobs = token_logprobs(self.logits, next_tokens)
        return self._emit(next_tokens.tolist(), logprobs.tolist(), next_tokens)

    def _emit(self, tokens: list[int], logprobs: list[float],
              as_tensor: torch.Tensor | None = None) -> Decoded:
        """The bookkeeping of one sampled token per row: EOS, the step count, the tokens to
        feed back (`as_tensor`: the same tokens, made already)."""
        emit = list(self.active)
        for i, tok in enumerate(tokens):
            if self.active[i] and tok == self.eos_id:
                self.active[i] = False
                emit[i] = False
                self.reasons[i] = "stop"
        self.steps += 1
        self.last = as_tensor if as_tensor is not None else torch.tensor(
            tokens, device=self.padded.device)
        if self.drafter is not None:
            self.generated.append(tokens[0])
        if not any(self.active) or self.steps == self.max_tokens:
            self.done = True
            self.stats.reasons = list(self.reasons)
            self._agreed.clear()
        return Decoded(tokens, logprobs, emit)


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
    with torch.inference_mode():
        run = Generation(model, prompts, params, eos_id=eos_id, chunk_size=chunk_size,
                         cancel=cancel, images=request_images)
        while not run.done:
            decoded = run.advance()
            if decoded is None:
                continue
            for i, keep in enumerate(decoded.emit):
                if keep:
                    out_tokens[i].append(decoded.tokens[i])
                    out_logprobs[i].append(decoded.logprobs[i])
    return out_tokens, out_logprobs


class Stream:
    """One prompt's generation as events: a `TokenEvent` per generated token as soon as it
    exists, then one `EndEvent`. Iterate it, or advance it one unit of work at a time with
    `step()` (a scheduler interleaving requests on one thread does); `close()` stops it where it
    is and gives its prefix cache back.

    `cancel` is checked before each unit of work. With a `prefix_cache` and a `cache_key`
    (e.g. the document), the longest prefix that `cache_key`'s last request shares with
    `prompt` is reused instead of prefilled (`EndEvent.cached_tokens`); whatever this request
    computes, even if it is cancelled half-way, is kept for the next one. `adapter` names a LoRA
    adapter of the model that runs during this stream's steps only (None: the thread's choice,
    the base model unless `model.with_lora` or `model.use_lora` chose one). `images`: the PIL
    images of the prompt's `[IMG]` tokens, in order (see `generate`); the prefix cache tells
    images apart by their content, not only by their tokens. `lookup`: up to this many drafted
    tokens checked per decode step, for greedy sampling (`lookup.py`: from the prompt, the
    tokens so far and what `cache_key`'s earlier requests generated); the output is the same.
    """

    def __init__(self, prompt: Sequence[int], model: Model,
                 sampling: SamplingParams | None = None, *,
                 cancel: CancellationToken | None = None, eos_id: int | None = None,
                 chunk_size: int | None = None, prefix_cache: PrefixCache | None = None,
                 cache_key: Hashable | None = None, adapter: str | None = None,
                 images: Sequence[Image.Image] | None = None,
                 image_limits: ImageLimits = DEFAULT_LIMITS, lookup: int = 0) -> None:
        params = sampling or SamplingParams()
        self.model = model
        self.prompt = list(prompt)
        _check_prompts([self.prompt], model.config.vocab_size)
        request_images = RequestImages(model, [self.prompt], [images] if images else None,
                                       image_limits)
        # What the prefix cache compares: token ids, and image patches by content.
        self._cache_tokens = request_images.cache_tokens(0, self.prompt)
        self.adapter = adapter
        self._text = TextStream(model.tokenizer)
        self._generated: list[int] = []  # every sampled token (EOS included)
        self._emitted = 0
        self._pending: deque[TokenEvent | EndEvent] = deque()
        self._prefix_cache = prefix_cache
        self._lease: Lease | None = None
        self.finished = False
        if prefix_cache is not None and cache_key is not None:
            self._lease = prefix_cache.checkout(cache_key, self._cache_tokens,
                                                needed=len(self.prompt) + params.max_tokens)
        lease = self._lease
        try:
            with self._adapter():  # checks the name too
                self._run = Generation(model, [self.prompt], params, eos_id=eos_id,
                                       chunk_size=chunk_size, cancel=cancel,
                                       cache=lease.cache if lease else None,
                                       start=lease.reused if lease else 0,
                                       save=lease is not None, images=request_images,
                                       drafter=Drafter(self.prompt,
                                                       lease.history if lease else ())
                                       if lookup else None,
                                       lookup=lookup)
        except BaseException:
            self.close()
            raise

    def step(self) -> list[TokenEvent | EndEvent]:
        """Run one unit of work; the events it produced (none for a prefill chunk; the
        `EndEvent` last, once the stream is over)."""
        if self.finished:
            return []
        run = self._run
        with torch.inference_mode(), self._adapter():
            decoded = run.advance()
        events: list[TokenEvent | EndEvent] = []
        if decoded is not None:
            token = decoded.tokens[0]
            self._generated.append(token)
            if decoded.emit[0]:
                self._emitted += 1
                events.append(TokenEvent(token, decoded.logprobs[0], self._text.push(token)))
        if run.done:
            self.close()
            stats = run.stats
            events.append(self._end(stats.reasons[0] if stats.reasons else "length"))
        return events

    def _adapter(self) -> contextlib.AbstractContextManager[None]:
        """The adapter this stream names, for one step; none named: whatever the thread uses
        (`model.with_lora(name, stream)` then chooses)."""
        if self.adapter is None:
            return contextlib.nullcontext()
        return self.model.use_lora(self.adapter)

    def stop(self) -> EndEvent:
        """End the stream now, as if it had stopped (the caller knows the answer is complete):
        the prefix cache keeps what was computed; the `EndEvent` says what it cost."""
        self.close()
        return self._end("stop")

    def _end(self, reason: FinishReason) -> EndEvent:
        stats = self._run.stats
        reused = self._lease.reused if self._lease else 0
        return EndEvent(reason=reason, prompt_tokens=stats.prompt_tokens,
                        generated_tokens=self._emitted, prefill_seconds=stats.prefill_seconds,
                        decode_seconds=stats.decode_seconds, text=self._text.flush(),
                        cached_tokens=reused, computed_tokens=stats.cached[0] - reused,
                        drafted_tokens=stats.drafted, accepted_tokens=stats.accepted)

    def close(self) -> None:
        """Stop here; the prefix cache keeps what was computed. Idempotent."""
        if self.finished:
            return
        self.finished = True
        if self._lease is not None and self._prefix_cache is not None:
            run = getattr(self, "_run", None)
            held = run.stats.cached[0] if run is not None else self._lease.reused
            self._prefix_cache.checkin(self._lease,
                                       [*self._cache_tokens, *self._generated][:held],
                                       self._generated)

    def __iter__(self) -> Iterator[TokenEvent | EndEvent]:
        return self

    def __next__(self) -> TokenEvent | EndEvent:
        while not self._pending:
            if self.finished:
                raise StopIteration
            self._pending.extend(self.step())
        return self._pending.popleft()


def stream(prompt: Sequence[int], model: Model, sampling: SamplingParams | None = None, *,
           cancel: CancellationToken | None = None, eos_id: int | None = None,
           chunk_size: int | None = None, prefix_cache: PrefixCache | None = None,
           cache_key: Hashable | None = None, adapter: str | None = None,
           images: Sequence[Image.Image] | None = None,
           image_limits: ImageLimits = DEFAULT_LIMITS, lookup: int = 0) -> Stream:
    """Stream one prompt's generation (see `Stream`)."""
    return Stream(prompt, model, sampling, cancel=cancel, eos_id=eos_id, chunk_size=chunk_size,
                  prefix_cache=prefix_cache, cache_key=cache_key, adapter=adapter,
                  images=images, image_limits=image_limits, lookup=lookup)
