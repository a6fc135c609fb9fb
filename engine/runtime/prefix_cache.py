"""Per-document caches of the last prompt, so that the next prompt prefills only what changed.

While a person types, consecutive FIM prompts of a document share almost all their tokens. A
`PrefixCache` keeps, per key (the server uses the document URI), the model cache of the last
request together with the tokens it holds (the prompt, then the generated tokens that were fed
back). A new prompt reuses the longest common token prefix and prefills only the rest; the
logits are those of a full recompute, because the cache is cut back exactly (`KVCache.keep`):

- full-attention layers hold every position, so cutting back is forgetting the positions after
  the common prefix;
- sliding-window layers keep a rotating buffer of `window + rewind` slots: a buffer of exactly
  `window` slots that has wrapped has already overwritten keys that a rewound query needs. The
  `rewind` margin keeps them for cuts of up to `rewind` tokens; a deeper cut is detected by
  `keep` and recomputed in full;
- a recurrent state (Mamba2) cannot be cut back at all: the state just before the last
  prompt's final token is saved (`Cache.save_point`/`save`) and continued from when the new
  prompt shares everything up to it (the same prompt again, or one that extends it), as is the
  live state when the new prompt extends all it holds.

Every cache answers `keep(n)` with what it can hold exactly, so nothing here depends on the
kind of cache.

Images: what is compared is not only token ids. A prompt's image patches are compared as
(content hash, patch index) (`RequestImages.cache_tokens`): two screenshots of the same size
have the same `[IMG]` ids, but the keys and values of their positions differ, and a cached prefix
stops at the first patch of the first image that changed.

Memory: every entry is one cache of the same geometry (`max_seq_len`, batch 1), allocated once
and reused: the number of entries is `budget_bytes // entry_bytes`, and the least recently used
document's cache is evicted (recycled for the newcomer) first. `drop(key)` frees a document's
cache (its memory goes back to the allocator). An entry is checked out while a request runs on
it (one request per document at a time; the server cancels the previous one first) and checked
back in after.

Drafts: each key also keeps what its last `HISTORY_OUTPUTS` requests generated, which
speculative decoding by lookup drafts from (`lookup.py`): a keystroke's completion often repeats
the last one's.

Thread safety: `checkout`, `checkin`, `drop` and `clear` take a lock; a cache checked out is
only touched by the thread that runs the request.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..arch.cache import Cache

if TYPE_CHECKING:
    from ..model import Model

log = logging.getLogger(__name__)

DEFAULT_REWIND = 512


def common_prefix_length(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    n = min(len(a), len(b))
    a, b = list(a), list(b)
    # By blocks compared in C, then one block element by element: a keystroke's ~2k tokens
    # took ~0.1 ms one by one in Python.
    block = 64
    start = 0
    while start + block <= n and a[start:start + block] == b[start:start + block]:
        start += block
    for i in range(start, n):
        if a[i] != b[i]:
            return i
    return n


# Outputs of a key's earlier requests kept for drafting (`lookup.py`): the newest, each cut to
# its first tokens.
HISTORY_OUTPUTS = 16
HISTORY_TOKENS = 256


@dataclass
class Lease:
    """A cache checked out for one request: positions [0, reused) already hold `prompt`;
    `history`: what the key's earlier requests generated, oldest first."""

    key: Hashable
    cache: Cache
    reused: int
    dropped: bool = field(default=False, repr=False)
    history: list[list[int]] = field(default_factory=list, repr=False)


@dataclass
class _Entry:
    cache: Cache
    # What positions [0, len) hold: token ids, and for image patches (content hash, index)
    tokens: list[Hashable]
    history: list[list[int]] = field(default_factory=list)


class PrefixCache:
    def __init__(self, model: Model, *, max_seq_len: int, budget_bytes: int,
                 rewind: int = DEFAULT_REWIND) -> None:
        if max_seq_len <= 0 or budget_bytes < 0 or rewind < 0:
            raise ValueError(f"invalid prefix cache size: max_seq_len={max_seq_len}, "
                             f"budget_bytes={budget_bytes}, rewind={rewind}")
        self.model = model
        self.max_seq_len = max_seq_len
        self.rewind = rewind
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()  # LRU first
        self._out: dict[Hashable, Lease] = {}
        self._spare: list[Cache] = []  # the probe cache, until a first document takes it
        self._lock = threading.Lock()
        probe = self._new_cache()
        self.entry_bytes = probe.nbytes(with_snapshot=True)
        self.max_entries = budget_bytes // self.entry_bytes if self.entry_bytes else 0
        if self.max_entries:
            self._spare.append(probe)
        else:
            log.warning("prefix cache disabled: one document's cache needs %.1f MiB, the "
                        "budget is %.1f MiB", self.entry_bytes / 2**20, budget_bytes / 2**20)

    # -- what callers see ---------------------------------------------------------------------

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries) + len(self._out)

    def nbytes(self) -> int:
        """Memory held: every cache allocated, in use, idle or spare."""
        with self._lock:
            return self.entry_bytes * (len(self._entries) + len(self._out) + len(self._spare))

    def cached_keys(self) -> list[Hashable]:
        """Cached keys, least recently used first (those checked out last)."""
        with self._lock:
            return [*self._entries, *self._out]

    def new_cache(self) -> Cache:
        """A cache of this prefix cache's geometry (what a compiled decode step is built for)."""
        return self._new_cache()

    def checkout(self, key: Hashable, prompt: Sequence[Hashable],
                 needed: int | None = None) -> Lease | None:
        """Take `key`'s cache for a request on `prompt`, cut back to the reusable prefix.

        At least the prompt's last token is left to prefill (its logits are needed). `needed`
        is the number of positions the request will use (prompt and generated tokens; default
        the prompt's). Returns None when caching cannot serve this request (it does not fit
        the cache, the budget is too small, or the key is already checked out): the caller
        then runs without it.
        """
        if not self.max_entries or max(len(prompt), needed or 0) > self.max_seq_len:
            return None
        with self._lock:
            if key in self._out:
                return None
            entry = self._entries.pop(key, None)
            if entry is None:
                cache = self._take_cache_locked()
                if cache is None:
                    return None
                entry = _Entry(cache, [])
            lease = Lease(key, entry.cache, 0, history=entry.history)
            self._out[key] = lease
        # Cutting back touches only this entry's tensors: outside the lock.
        want = min(common_prefix_length(entry.tokens, prompt), len(prompt) - 1)
        lease.reused = entry.cache.keep(want)
        return lease

    def checkin(self, lease: Lease, tokens: Sequence[Hashable],
                output: Sequence[int] = ()) -> None:
        """Give the cache back; it now holds `tokens` at positions [0, len(tokens)). `output`:
        what the request generated, kept in the key's history."""
        history = lease.history
        if output:
            history = [*history[-(HISTORY_OUTPUTS - 1):], list(output[:HISTORY_TOKENS])]
        with self._lock:
            if self._out.get(lease.key) is not lease:
                return
            del self._out[lease.key]
            if lease.dropped:
                return  # the last reference: its memory goes with it
            self._entries[lease.key] = _Entry(lease.cache, list(tokens), history)

    def drop(self, key: Hashable) -> bool:
        """Forget `key`'s cache (the document was closed). True if there was one."""
        with self._lock:
            if (lease := self._out.get(key)) is not None:
                lease.dropped = True  # freed when its request checks it back in
                return True
            return self._entries.pop(key, None) is not None

    def clear(self) -> None:
        with self._lock:
            for lease in self._out.values():
                lease.dropped = True
            self._entries.clear()
            self._spare.clear()

    # -- internals ----------------------------------------------------------------------------

    def _new_cache(self) -> Cache:
        return self.model.new_cache(1, self.max_seq_len, rewind=self.rewind)

    def _take_cache_locked(self) -> Cache | None:
        if self._spare:
            return self._spare.pop()
        if len(self._entries) + len(self._out) < self.max_entries:
            return self._new_cache()
        if not self._entries:
            return None  # every cache is in use by a running request
        evicted_key, evicted = self._entries.popitem(last=False)
        log.debug("prefix cache: evicted %s", evicted_key)
        return evicted.cache
