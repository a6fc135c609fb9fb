"""CUDA graphs for the one-token decode step (`FastDecoder` on a CUDA device).

At batch 1 a GPU decode step is hundreds of small kernels (a 200M model's, ~20 a layer), and
launching them from Python takes longer than running them: the GPU waits on the CPU. A CUDA
graph records the launches once and replays them all with one call. It replays the *addresses*
it was captured with, hence:

- the step's own inputs (token ids and positions, B each) are copied into two static buffers
  that every graph reads, and its logits land in a static output that each graph owns (copied
  out before the next replay can overwrite them);
- the cache is read and written in place, at its own addresses. Every `KVCache` is allocated
  once at the decoder's `max_seq_len` and cleared or trimmed in place (`arch/cache.py`), and the
  prefix cache hands a document the same cache on every keystroke: a graph captured against a
  cache stays valid for as long as its tensors live. A graph is keyed by the addresses and
  shapes of the cache views the step touches, so by the cache and by the spans it attends over
  (the compiled step's one dynamic size, which a captured graph bakes in): a new document, or a
  cache growing into the next span of `FastDecoder.SPAN_STEP` slots, captures once, and every
  later step with that key replays. A cache freed and another of the same geometry allocated
  at the same addresses replays correctly, as the key is exactly what the graph touches. Keys
  no step asks for any more age out: `limit` graphs are kept, the least recently used dropped.
- capturing runs the step on padding rows only (position -1), which leave the cache as it was
  (`compiled._DecodeStep`): a warm-up run outside the capture (lazy initialisations such as
  cuBLAS workspaces must not happen inside it), then the capture itself, which runs nothing.

Why not inductor's own graphs (`mode="reduce-overhead"`): they accept in-place writes only into
parameters, buffers and earlier graphs' outputs, and run a step that writes a cache passed as an
argument without a graph. vLLM keeps every sequence in one pool addressed through a block table,
the graph's input; with one cache per document, reused across keystrokes, a graph per cache and
span needs no change of the cache or the prefix cache.

Steps of one `StepGraphs` must not overlap (the static buffers are shared): the engine runs one
step at a time. All graphs share one memory pool for their intermediates, which is safe for
replays that never overlap and whose outputs are copied out at once.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence

import torch

# A capture takes the step as a call without arguments (it reads the static buffers) and gives
# back the replay and the static output the replay writes.
Replay = Callable[[], None]
Capture = Callable[[Callable[[], torch.Tensor]], tuple[Replay, torch.Tensor]]
StepFunction = Callable[[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor],
                         list[torch.Tensor]], torch.Tensor]

# Held while a graph is captured, and by a decoder compiling on a CUDA device.
CAPTURING = threading.Lock()


class CudaCapture:
    """`torch.cuda.CUDAGraph` captures on one device, their intermediates in one shared pool."""

    WARM_UP_RUNS = 3  # as PyTorch's CUDA graph examples do before capturing

    def __init__(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {device}")
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()

    def __call__(self, run: Callable[[], torch.Tensor]) -> tuple[Replay, torch.Tensor]:
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(self.WARM_UP_RUNS):
                run()
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # The server compiles decoders on a thread of its own, and a compile runs the step on
        # the GPU: work queued from another thread while a capture is under way can invalidate
        # it (the legacy default stream synchronizes with the capturing one), so captures and
        # compiles take turns (`CAPTURING`, which `FastDecoder` holds while it compiles).
        with CAPTURING, torch.cuda.graph(graph, pool=self.pool):
            out = run()
        return graph.replay, out


class StepGraphs:
    """`step(tokens, positions, slot_pos, keys, values)` (`compiled._DecodeStep`'s call, compiled
    or not) through captured graphs, one per set of cache views; see the module's docstring.

    `capture` defaults to `CudaCapture(device)`; the tests give one that reruns the step on the
    static buffers (what a replay does, on any device).
    """

    def __init__(self, step: StepFunction, batch_size: int, device: torch.device, *,
                 capture: Capture | None = None, limit: int = 64) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self._step = step
        self._capture = capture if capture is not None else CudaCapture(device)
        self.limit = limit
        # Made in inference mode, as `FastDecoder.step` makes its inputs: the compiled step
        # guards on its inputs' dispatch keys, and a tensor made outside would compile it again.
        with torch.inference_mode():
            self.tokens = torch.zeros(batch_size, dtype=torch.long, device=device)
            self.positions = torch.full((batch_size,), -1, dtype=torch.long, device=device)
        self._graphs: OrderedDict[Hashable, tuple[Replay, torch.Tensor]] = OrderedDict()
        self.captures = 0  # graphs captured so far (a new cache or span each)
        self.replays = 0

    def __len__(self) -> int:
        return len(self._graphs)

    @staticmethod
    def key(views: Sequence[torch.Tensor]) -> Hashable:
        """What a graph captured over `views` touches: their addresses, shapes and strides."""
        return tuple((t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) for t in views)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, slot_pos: list[torch.Tensor],
                 keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
        if tokens.shape != self.tokens.shape or positions.shape != self.positions.shape:
            raise ValueError(f"expected tokens and positions of shape {tuple(self.tokens.shape)}, "
                             f"got {tuple(tokens.shape)} and {tuple(positions.shape)}")
        key = self.key([*slot_pos, *keys, *values])
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._record(key, slot_pos, keys, values)
        else:
            self._graphs.move_to_end(key)
        replay, out = entry
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        replay()
        self.replays += 1
        return out.clone()

    def _record(self, key: Hashable, slot_pos: list[torch.Tensor], keys: list[torch.Tensor],
                values: list[torch.Tensor]) -> tuple[Replay, torch.Tensor]:
        # Padding rows while the capture runs the step: the cache stays as it was.
        self.tokens.zero_()
        self.positions.fill_(-1)

        def run() -> torch.Tensor:
            return self._step(self.tokens, self.positions, slot_pos, keys, values)

        entry = self._capture(run)
        self._graphs[key] = entry
        self.captures += 1
        while len(self._graphs) > self.limit:
            self._graphs.popitem(last=False)
        return entry
