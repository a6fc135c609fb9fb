"""What a transformer remembers of each sequence: the key/value cache, allocated once per batch
of sequences and updated in place (Mamba2's recurrent state is in recurrent.py).

Layout, per layer: keys and values of shape (B, n_kv_heads, capacity + 1, head_dim).

- A full-attention layer's capacity is the longest sequence the batch will reach; position p
  lives in slot p.
- A sliding-window layer keeps only its window: capacity = min(window + rewind, max_seq_len),
  and position p lives in slot p % capacity (a rotating buffer). Memory is bounded by the
  window, whatever the prompt length. `rewind` extra slots let a cache that has wrapped be cut
  back (`keep`) by up to `rewind` tokens and stay exact: the keys the next query needs are still
  there. A prefix cache that reuses a document's last prompt needs that; one-off generation
  uses rewind 0.
- The extra last slot is a sink: padding tokens (rows of a batch shorter than the chunk) and
  tokens that a later token of the same chunk overwrites are written there, so a write is one
  `index_copy_` a row with no branches. The sink is never attended to.

Layers with the same (capacity, window) share one slot map, `slot_pos[b, s]` = the absolute
position held by slot s of row b, or -1. The mask of every layer in such a group is the same,
so it is built once per forward in `plan()`, not once per layer.

Trade-off: rows are padded to the longest one (rectangular allocation). A paged cache would
waste less with very unequal prompts; for an editor's batch sizes (mostly 1) this is simpler
and keeps shapes static for compiled decode steps.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Protocol

import torch

from . import pages
from .config import TransformerConfig


class Cache(Protocol):
    """What the runtime needs of any architecture's cache (`KVCache` here; Mamba2's recurrent
    state in recurrent.py): the prefix cache and the generation loop use only this."""

    batch_size: int
    max_seq_len: int

    def nbytes(self, with_snapshot: bool = False) -> int:
        """Bytes held; `with_snapshot`: also what `save()` will hold beside it."""
        ...

    def clear(self) -> None:
        """Forget every position."""
        ...

    def keep(self, n: int) -> int:
        """Hold exactly the first `m <= n` positions of each row, for the largest `m` this cache
        can restore, and return `m` (0: cleared)."""
        ...

    def save_point(self, length: int) -> int | None:
        """Where a prefill of `length` tokens must pause for `save()`, so that a later prompt
        can continue from there; None when the cache can be cut back anywhere."""
        ...

    def save(self) -> None:
        """Keep a copy of the state as it is now (see `save_point`)."""
        ...

    def geometry(self) -> Hashable:
        """What a compiled step specialises on (caches of equal geometry are interchangeable)."""
        ...


@dataclass
class AttentionPlan:
    """How every layer of one group attends during one forward."""

    slots: torch.Tensor  # (B, T) int64: the slot each new token goes to
    write_first: bool  # write the new keys, then attend over the cache only
    upto: int  # with write_first: attend over slots [0, upto)
    mask: torch.Tensor  # (B, 1, T, K) bool, True where a query may attend a key
    # The mask is plain causal over slots [0, T) (a first chunk, no padding, window not
    # reached): SDPA's is_causal kernel is faster than an explicit mask.
    causal: bool = False


@dataclass(frozen=True)
class _Group:
    capacity: int
    window: int | None


class KVCache:
    def __init__(
        self,
        config: TransformerConfig,
        batch_size: int,
        max_seq_len: int,
        *,
        device: torch.device | str,
        dtype: torch.dtype,
        rewind: int = 0,
    ) -> None:
        if rewind < 0:
            raise ValueError(f"rewind must be >= 0, got {rewind}")
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        self.rewind = rewind
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        groups: list[_Group] = []
        self.layer_group: list[int] = []
        for window in config.sliding_windows:
            capacity = max_seq_len if window is None else min(window + rewind, max_seq_len)
            group = _Group(capacity, window if window is not None and window < max_seq_len
                           else None)
            if group not in groups:
                groups.append(group)
            self.layer_group.append(groups.index(group))
        self.groups = groups
        self.slot_pos = [
            torch.full((batch_size, g.capacity + 1), -1, dtype=torch.long, device=device)
            for g in groups
        ]
        shapes = [(batch_size, config.n_kv_heads, groups[g].capacity + 1, config.head_dim)
                  for g in self.layer_group]
        tensors = pages.zeros(shapes * 2, dtype, device)
        self.keys, self.values = tensors[:len(shapes)], tensors[len(shapes):]

    def nbytes(self, with_snapshot: bool = False) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def save_point(self, length: int) -> int | None:
        return None  # cut back anywhere: `keep` needs no saved copy

    def save(self) -> None:
        pass

    def geometry(self) -> tuple[int, tuple[tuple[int, int | None], ...]]:
        """What a compiled step specialises on: batch size and (capacity, window) per group."""
        return self.batch_size, tuple((g.capacity, g.window) for g in self.groups)

    def clear(self) -> None:
        """Forget every position (keys and values stay; they are masked, never read)."""
        for spos in self.slot_pos:
            spos.fill_(-1)

    def keep(self, n: int) -> int:
        """Cut every row back to its first `n` positions, if that is exact; return what is kept.

        Exact means the cache still holds every key that a token at position `n` attends to:
        positions [0, n) on full-attention layers, the last `window - 1` of them on
        sliding-window layers (a rotating buffer that wrapped past them has lost them; the
        `rewind` margin is what keeps them). Then positions >= n are forgotten and `n` is
        returned; otherwise the cache is cleared and 0 returned.
        """
        if n <= 0:
            self.clear()
            return 0
        for group, spos in zip(self.groups, self.slot_pos, strict=True):
            lo = 0 if group.window is None else max(0, n - group.window + 1)
            held = ((spos >= lo) & (spos < n)).sum(dim=1)  # (B,)
            if bool((held != n - lo).any()):
                self.clear()
                return 0
        for spos in self.slot_pos:
            spos.masked_fill_(spos >= n, -1)
        return n

    def plan(self, positions: torch.Tensor) -> list[AttentionPlan]:
        """Plan one forward of tokens at `positions: (B, T)` (-1 = padding); updates slot maps.

        Must be called exactly once per forward, before the layers run.
        """
        if int(positions.max()) >= self.max_seq_len:
            raise ValueError(
                f"position {int(positions.max())} is beyond the cache ({self.max_seq_len})"
            )
        return [self._plan_group(i, positions) for i in range(len(self.groups))]

    def _plan_group(self, index: int, positions: torch.Tensor) -> AttentionPlan:
        group = self.groups[index]
        cap, window = group.capacity, group.window
        seqlen = positions.shape[1]
        valid = positions >= 0
        # A rotating buffer can take the chunk before attention only if no new token
        # overwrites a key that a query of the same chunk still needs: token p overwrites
        # p - cap, the chunk's first query needs keys from start - window + 1 on.
        write_first = window is None or seqlen <= cap - window + 1
        if write_first:
            keep = valid
        else:
            # Only the last `cap` positions of each row survive in the buffer.
            row_end = positions.max(dim=1, keepdim=True).values
            keep = valid & (positions > row_end - cap)
        slots = torch.where(keep, positions % cap, cap)  # (B, T); cap = the sink
        slot_pos = self.slot_pos[index]
        qp = positions[:, :, None]  # (B, T, 1)
        if write_first:
            slot_pos.scatter_(1, slots, torch.where(keep, positions, -1))
            slot_pos[:, cap] = -1
            upto = min(cap, int(slot_pos[:, :cap].max()) + 1) if window is None else cap
            kp = slot_pos[:, None, :upto]  # (B, 1, K)
        else:
            upto = cap
            kp = torch.cat((slot_pos[:, :cap], positions), dim=1)[:, None, :]  # (B, 1, cap+T)
            slot_pos.scatter_(1, slots, torch.where(keep, positions, -1))
            slot_pos[:, cap] = -1
        allowed = (kp >= 0) & (kp <= qp)
        if window is not None:
            allowed &= qp - kp < window
        # Padding queries attend to everything (finite garbage, discarded): a fully masked row
        # would make softmax produce NaN, and NaN values poison even masked-out products.
        allowed |= (qp < 0)
        causal = (write_first and seqlen > 1 and upto == seqlen
                  and (window is None or seqlen <= window)
                  and bool((positions == torch.arange(seqlen, device=positions.device)).all()))
        return AttentionPlan(
            slots=slots,
            write_first=write_first,
            upto=upto,
            mask=allowed[:, None],
            causal=causal,
        )

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values `(B, Hkv, T, hd)` and return what the layer attends over."""
        cache_k, cache_v = self.keys[layer], self.values[layer]
        if plan.write_first:
            _write(cache_k, plan.slots, k)
            _write(cache_v, plan.slots, v)
            return cache_k[:, :, : plan.upto], cache_v[:, :, : plan.upto]
        keys = torch.cat((cache_k[:, :, : plan.upto], k), dim=2)
        values = torch.cat((cache_v[:, :, : plan.upto], v), dim=2)
        _write(cache_k, plan.slots, k)
        _write(cache_v, plan.slots, v)
        return keys, values


def _write(cache: torch.Tensor, slots: torch.Tensor, new: torch.Tensor) -> None:
    """`cache[b, :, slots[b, t]] = new[b, :, t]` for every row b and token t (the sink takes
    every token that keeps nothing, in any order). One `index_copy_` a row: `scatter_` of the
    same writes copied the whole of a bfloat16 cache twice on the CPU (through float32), 1.0-1.3
    ms a layer and tensor at 2.5k slots, 6% of a 1.5k-token first prompt."""
    for b in range(cache.shape[0]):
        cache[b].index_copy_(1, slots[b], new[b])
