"""Mamba2's recurrent state: what a state-space model remembers of each sequence (the network
is in mamba2.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import MambaConfig


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
    instead saves it (`save_point`/`save`: `checkpoint()` before a prompt's last token) and
    `keep(n)` continues from the live state or that copy when the next prompt extends them.
    `max_seq_len` is recorded for the callers' bookkeeping only: it bounds nothing here.
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

    def nbytes(self, with_snapshot: bool = False) -> int:
        """Bytes of the live state (Codestral Mamba: 260 MiB); `with_snapshot`: with the copy
        `checkpoint()` keeps beside it, as many again."""
        live = sum(t.numel() * t.element_size() for t in (self.conv, self.ssm))
        return live * 2 if with_snapshot else live

    def geometry(self) -> tuple[str, int]:
        return ("recurrent", self.batch_size)

    def save_point(self, length: int) -> int:
        """Before the prompt's last token: the same prompt again, or one that extends it, then
        continues from the copy and recomputes that token (its logits are needed)."""
        return length - 1

    def save(self) -> None:
        self.checkpoint()

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
        """Hold a state of at most `n` tokens, the longest of: the live state, the last
        `checkpoint()`, nothing; return its length (every row must hold the same length).

        The counterpart of `KVCache.keep` for a prefix cache: a recurrent state cannot be cut
        back, only continued from a copy taken at that length.
        """
        held = self._uniform(self.lengths)
        if 0 < held <= n:
            return held
        saved = self._uniform(self.snapshot.lengths) if self.snapshot is not None else 0
        if 0 < saved <= n:
            self.restore()
            return saved
        self.reset()
        return 0

    @staticmethod
    def _uniform(lengths: torch.Tensor) -> int:
        """The length all rows share, or 0 when they differ."""
        first = int(lengths[0])
        return first if bool((lengths == first).all()) else 0

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
