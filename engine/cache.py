"""What a model remembers of each sequence: the key/value cache of the transformers, allocated
once per batch of sequences and updated in place; and Mamba2's recurrent state (`MambaCache`,
at the end).

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
  `scatter_` with no branches. The sink is never attended to.

Layers with the same (capacity, window) share one slot map, `slot_pos[b, s]` = the absolute
position held by slot s of row b, or -1. The mask of every layer in such a group is the same,
so it is built once per forward in `plan()`, not once per layer.

Trade-off: rows are padded to the longest one (rectangular allocation). A paged cache would
waste less with very unequal prompts; for an editor's batch sizes (mostly 1) this is simpler
and keeps shapes static for compiled decode steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .config import TransformerConfig

if TYPE_CHECKING:
    from .mamba2 import MambaConfig


@dataclass
class AttentionPlan:
    """How every layer of one group attends during one forward."""

    slots: torch.Tensor  # (B, Hkv, T, hd)-expanded index of the slot each new token goes to
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
        shape = (batch_size, config.n_kv_heads)
        self.keys = [
            torch.zeros(*shape, groups[g].capacity + 1, config.head_dim, device=device,
                        dtype=dtype)
            for g in self.layer_group
        ]
        self.values = [torch.zeros_like(k) for k in self.keys]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

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
        bsz, seqlen = positions.shape
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
        index_shape = (bsz, self.n_kv_heads, seqlen, self.head_dim)
        causal = (write_first and seqlen > 1 and upto == seqlen
                  and (window is None or seqlen <= window)
                  and bool((positions == torch.arange(seqlen, device=positions.device)).all()))
        return AttentionPlan(
            slots=slots[:, None, :, None].expand(index_shape),
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
            cache_k.scatter_(2, plan.slots, k)
            cache_v.scatter_(2, plan.slots, v)
            return cache_k[:, :, : plan.upto], cache_v[:, :, : plan.upto]
        keys = torch.cat((cache_k[:, :, : plan.upto], k), dim=2)
        values = torch.cat((cache_v[:, :, : plan.upto], v), dim=2)
        cache_k.scatter_(2, plan.slots, k)
        cache_v.scatter_(2, plan.slots, v)
        return keys, values


# ---------------------------------------------------------------------------------------------
# Mamba2's recurrent state (the model is in mamba2.py)


@dataclass(frozen=True)
class MambaSnapshot:
    """A copy of a `MambaCache`'s whole state (see `MambaCache.checkpoint`)."""

    conv: torch.Tensor
    ssm: torch.Tensor
    lengths: torch.Tensor


class MambaCache:
    """What a Mamba2 model remembers of each row: constant in size, whatever the length.

    Per layer: `conv[layer]` (B, conv_dim, d_conv - 1), the last inputs of the causal
    convolution, in the model's dtype (they are stored activations: no precision is lost); and
    `ssm[layer]` (B, heads, head_dim, d_state) in float32, since it accumulates over the whole
    sequence. `lengths` (B,) counts the tokens each row has consumed: a recurrent state can only
    be extended, so `advance` refuses positions that do not continue it.

    Unlike a KV cache it cannot be cut back to an earlier position. A per-document prefix cache
    instead calls `checkpoint()` after a prompt's prefill and `restore()` (or `keep(n)`) when
    the next prompt extends that one. `max_seq_len` is recorded for the callers' bookkeeping
    only: it bounds nothing here.
    """

    def __init__(self, config: MambaConfig, batch_size: int, max_seq_len: int, *,
                 device: torch.device | str, dtype: torch.dtype) -> None:
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        # Normal tensors even when made in inference mode: updatable in and out of that mode.
        with torch.inference_mode(False):
            self.conv = torch.zeros(config.n_layers, batch_size, config.conv_dim,
                                    config.d_conv - 1, device=device, dtype=dtype)
            self.ssm = torch.zeros(config.n_layers, batch_size, config.n_heads,
                                   config.head_dim, config.d_state, device=device,
                                   dtype=torch.float32)
            self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.snapshot: MambaSnapshot | None = None

    def nbytes(self) -> int:
        """Bytes of the live state; once `checkpoint()` is called, the copy holds as many again
        (Codestral Mamba: 260 MiB each)."""
        return sum(t.numel() * t.element_size() for t in (self.conv, self.ssm))

    def reset(self) -> None:
        """Back to the empty state (the checkpoint, if any, is kept)."""
        self.conv.zero_()
        self.ssm.zero_()
        self.lengths.zero_()

    clear = reset  # the name `KVCache` uses

    def checkpoint(self) -> MambaSnapshot:
        """Copy the whole state aside, over the previous copy, and return that copy.

        The copy's memory is allocated at the first call and reused by the next ones (a prefix
        cache checkpoints at every request): a returned snapshot changes at the next call.
        """
        if self.snapshot is None:
            with torch.inference_mode(False):
                self.snapshot = MambaSnapshot(self.conv.clone(), self.ssm.clone(),
                                              self.lengths.clone())
        else:
            self.snapshot.conv.copy_(self.conv)
            self.snapshot.ssm.copy_(self.ssm)
            self.snapshot.lengths.copy_(self.lengths)
        return self.snapshot

    def restore(self, snapshot: MambaSnapshot | None = None) -> None:
        """Put back `snapshot` (default: the last `checkpoint()`); the copy stays for reuse."""
        if snapshot is None:
            snapshot = self.snapshot
        if snapshot is None:
            raise ValueError("restore() without a checkpoint: call checkpoint() first")
        if snapshot.ssm.shape != self.ssm.shape or snapshot.conv.shape != self.conv.shape:
            raise ValueError(f"snapshot of shape {tuple(snapshot.ssm.shape)} does not fit this "
                             f"cache's {tuple(self.ssm.shape)}")
        self.conv.copy_(snapshot.conv)
        self.ssm.copy_(snapshot.ssm)
        self.lengths.copy_(snapshot.lengths)

    def keep(self, n: int) -> int:
        """Make every row hold exactly its first `n` tokens if an exact state exists; return
        what is held: `n` (the current state or the checkpoint) or else 0 (state reset).

        The counterpart of `KVCache.keep` for a prefix cache: a recurrent state cannot be cut
        back, only replaced by a copy taken at that length.
        """
        if n > 0 and bool((self.lengths == n).all()):
            return n
        if n > 0 and self.snapshot is not None and bool((self.snapshot.lengths == n).all()):
            self.restore()
            return n
        self.reset()
        return 0

    def advance(self, positions: torch.Tensor) -> torch.Tensor:
        """Check that `positions: (B, T)` continue each row, count them; returns (B,) counts.

        Each row's tokens must be at positions lengths[b], lengths[b] + 1, ... followed only by
        padding (-1). Must be called exactly once per forward, before the layers run.
        """
        if positions.shape[0] != self.batch_size:
            raise ValueError(f"{positions.shape[0]} rows for a cache of {self.batch_size}")
        steps = torch.arange(positions.shape[1], device=positions.device)
        counts = (positions >= 0).sum(dim=1)
        expected = torch.where(steps < counts[:, None], self.lengths[:, None] + steps, -1)
        if not torch.equal(positions, expected):
            row = int((positions != expected).any(dim=1).nonzero()[0, 0])
            raise ValueError(
                f"row {row}: positions {positions[row].tolist()[:8]} do not continue its "
                f"recurrent state, which holds {int(self.lengths[row])} tokens (expected "
                f"consecutive positions from there, padding only at the end)")
        self.lengths += counts
        return counts
