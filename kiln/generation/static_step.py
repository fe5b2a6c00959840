"""A decode step with static shapes, captured once and replayed.

At batch 1 a decode step runs a few hundred small ops; the Python and dispatch around them,
not the weights, then set much of the speed. Captured once, a step replays without them:

- on CPU as a TorchScript trace (no Python between ops: 1.2-1.4x faster decode steps for
  Pythia-410m/1b int8 on a 2-core Xeon, 1.8x for SmolLM2 at 4 rows on an AMD EPYC). The
  trace reads the batch size and the attention length from its inputs' shapes, so ONE trace
  serves every batch and every length (exact against eager steps): it is made when the
  engine starts, and no request ever waits for a capture. `torch.jit.trace` is deprecated;
  where it is gone or fails, the step runs eagerly.
- on CUDA as a CUDA graph (no kernel launches from the host). A graph fixes every shape and
  address, so the step runs on:

- a bucketed batch: B rows run as the next power of two; the extra rows are padding that
  writes to the cache's scratch column and whose logits are dropped;
- a bucketed attention length: keys are read up to a multiple of KV_BUCKET columns (the
  mask hides columns past each row's position, so reading more changes nothing);
- static input buffers (token ids, positions) copied in before each replay.

Rows are the dense slots 0..B-1 of the engine's slot pool (the engine keeps used slots
dense), so the captures read the one KV cache in place, with no gather of slots. One graph
per (batch bucket, attention bucket), made once for the engine's lifetime and replayed for
every request after; graphs share one memory pool. Without capture (`capture=None`) the same
buffers, buckets and padding run eagerly, which is how the CPU tests cover everything but the
CUDA capture itself.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

KV_BUCKET = 256
CPU_KV_BUCKET = 32  # a multiple of every vector width: a row reads whole zero chunks beyond
#                     its end, whose exact zeros leave its sums as they are (batch invariance)
WARMUP_RUNS = 2  # before capture: cuBLAS workspaces, Triton autotuning, lazy tables


def batch_bucket(rows: int) -> int:
    """The power of two >= rows that the step runs at."""
    return 1 << max(rows - 1, 0).bit_length()


def kv_bucket(kv_length: int, max_length: int, bucket: int = KV_BUCKET) -> int:
    """Columns a step reads: a multiple of KV_BUCKET where a step is built per shape (CUDA
    graphs, and their eager stand-in), of CPU_KV_BUCKET on CPU otherwise (the one trace
    takes any length; attention there streams every column it reads from memory, so 256-column
    buckets cost up to 2x the reads needed)."""
    return min(-(-kv_length // bucket) * bucket, max_length)


def read_bucket(device: torch.device | str) -> int:
    return CPU_KV_BUCKET if torch.device(device).type == "cpu" else KV_BUCKET


@dataclass
class _Step:
    ids: torch.Tensor  # [B', 1] static token ids
    positions: torch.Tensor  # [B', 1] static cache positions
    slots: torch.Tensor | None = None  # [B'] static slot of each row (slot-addressed steps)
    logits: torch.Tensor | None = None  # [B', V] written by every run
    graph: object | None = None  # torch.cuda.CUDAGraph when captured


class _CacheView:
    """What Decoder.forward reads of a KV cache: the per-layer key and value tensors."""

    def __init__(self, keys, values) -> None:
        self.keys, self.values = keys, values


class _StepModule(nn.Module):
    """The decode step as a module of flat tensor inputs, which is what tracing needs. The
    attention length is the length of `columns`, so the trace reads it from the input's
    shape instead of baking it in (the batch size likewise comes from `ids`)."""

    def __init__(self, model: nn.Module, addressed: bool) -> None:
        super().__init__()
        self.model = model
        self.addressed = addressed
        self.layers = len(model.layers)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, columns: torch.Tensor,
                *rest: torch.Tensor):
        slots, kv = (rest[0], rest[1:]) if self.addressed else (None, rest)
        cache = _CacheView(kv[: self.layers], kv[self.layers:])
        return self.model(ids, positions, cache, kv_length=columns.shape[0], slots=slots,
                          decode=True)[:, -1]


def default_capture(device: torch.device) -> str | None:
    if device.type == "cuda":
        return "cuda_graph"
    return "trace" if hasattr(torch.jit, "trace") else None


class StaticDecodeStep:
    """`step(ids, positions, cache, kv_length)` == `model(ids[:, None], positions[:, None],
    cache, kv_length=kv_length)[:, -1]`, run traced (CPU), replayed (CUDA) or eagerly at
    static shapes.

    With `slots`, rows name their cache slot (several rows may share one: speculative
    verification runs a sequence's proposals as rows of its slot); such steps are captured
    separately, at power-of-two row counts that may exceed the slots."""

    def __init__(self, model: torch.nn.Module, capture: str | None) -> None:
        if capture not in ("cuda_graph", "trace", None):
            raise ValueError(f"capture must be 'cuda_graph', 'trace' or None, got {capture!r}")
        self.model = model
        self.capture = capture
        self._steps: dict[tuple[int, int, bool], _Step] = {}  # graphs or eager buffers
        self._traces: dict[bool, object] = {}  # addressed -> the one trace of that kind
        self._columns: torch.Tensor | None = None  # 0..max_length-1, sliced per step
        self._cache = None  # the KV cache the steps were built for
        self._pool = None

    def step(self, ids: torch.Tensor, positions: torch.Tensor, cache, kv_length: int,
             slots: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, V] of one decode step; valid until the next call."""
        rows = ids.shape[0]
        addressed = slots is not None
        if not addressed and rows > cache.num_slots:
            raise ValueError(f"a batch of {rows} rows needs {rows} slots but the cache has "
                             f"{cache.num_slots}")
        if cache is not self._cache:  # captures hold the old cache's tensors
            self.reset()
            self._cache = cache
        kv_length = kv_bucket(kv_length, cache.max_length,
                              CPU_KV_BUCKET if self.capture == "trace" else KV_BUCKET)
        if self.capture == "trace":
            traced = self._trace_for(addressed, cache)
            if traced is not None:
                extra = (slots,) if addressed else ()
                return traced(ids.view(-1, 1), positions.view(-1, 1), self._columns[:kv_length],
                              *extra, *cache.keys, *cache.values)
        bucket = batch_bucket(rows) if addressed else min(batch_bucket(rows), cache.num_slots)
        key = (bucket, kv_length, addressed)
        step = self._steps.get(key)
        if step is None:
            step = self._steps[key] = self._build(key, cache)
        step.ids[:rows].copy_(ids.view(-1, 1))
        step.positions[:rows].copy_(positions.view(-1, 1))
        if addressed:
            step.slots[:rows].copy_(slots)
        if rows < bucket:  # an earlier, larger batch may have left real positions there
            step.ids[rows:].zero_()
            step.positions[rows:].fill_(cache.scratch_position)
            if addressed:
                step.slots[rows:].zero_()  # slot 0's scratch column: never read
        if step.graph is not None:
            step.graph.replay()
        else:
            step.logits = self._run(step, cache, key[1])
        return step.logits[:rows]

    def build(self, rows: int, kv_length: int, cache) -> None:
        """Capture the step for `rows` rows and `kv_length` columns now, if not yet done (a
        trace, which serves every shape, takes ~1.5 s for SmolLM2 on 2 cores: better when
        the engine starts than inside a stream)."""
        if cache is not self._cache:
            self.reset()
            self._cache = cache
        if self.capture == "trace":
            self._trace_for(False, cache)
            if self.capture == "trace":
                return
        key = (min(batch_bucket(rows), cache.num_slots), kv_bucket(kv_length, cache.max_length),
               False)
        if key not in self._steps:
            self._steps[key] = self._build(key, cache)

    def reset(self) -> None:
        """Drop every capture (graphs' memory returns to the allocator) and the cache they use."""
        self._steps.clear()
        self._traces.clear()
        self._columns = None
        self._pool = None
        self._cache = None

    def _run(self, step: _Step, cache, kv_length: int) -> torch.Tensor:
        return self.model(step.ids, step.positions, cache, kv_length=kv_length, slots=step.slots,
                          decode=True)[:, -1]

    def _build(self, key: tuple[int, int, bool], cache) -> _Step:
        bucket, kv_length, addressed = key
        device = cache.device
        # Padding rows (and every row while warming up and capturing) write to the scratch
        # column, so building a graph never touches a real cache entry.
        step = _Step(ids=torch.zeros(bucket, 1, dtype=torch.long, device=device),
                     positions=torch.full((bucket, 1), cache.scratch_position, device=device),
                     slots=torch.zeros(bucket, dtype=torch.long, device=device)
                     if addressed else None)
        if self.capture == "cuda_graph":
            self._capture_graph(step, cache, kv_length)
        return step

    def _trace_for(self, addressed: bool, cache):
        """The trace of this kind of step, made on first use; None (and eager steps from then
        on) when tracing fails."""
        traced = self._traces.get(addressed)
        if traced is not None:
            return traced
        device = cache.device
        if self._columns is None:
            self._columns = torch.arange(cache.max_length, device=device)
        rows = min(2, cache.num_slots) if not addressed else 2  # 2: no size-1 special cases
        inputs = (torch.zeros(rows, 1, dtype=torch.long, device=device),
                  torch.full((rows, 1), cache.scratch_position, device=device),
                  self._columns[:KV_BUCKET],
                  *((torch.zeros(rows, dtype=torch.long, device=device),) if addressed else ()),
                  *cache.keys, *cache.values)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # deprecation, and Python values made constants
                traced = torch.jit.trace(_StepModule(self.model, addressed), inputs,
                                         check_trace=False)
        except Exception as error:  # noqa: BLE001 - any failure: run eagerly, as before
            warnings.warn(f"kiln: decode steps run eagerly, tracing failed: {error}",
                          RuntimeWarning, stacklevel=3)
            self.capture = None
            return None
        # TorchScript profiles a function's first runs and optimizes it then (~0.7 s for
        # SmolLM2): done here, on padding rows that write only the scratch column.
        for _ in range(WARMUP_RUNS + 1):
            traced(*inputs)
        self._traces[addressed] = traced
        return traced

    def _capture_graph(self, step: _Step, cache, kv_length: int) -> None:
        side = torch.cuda.Stream(device=cache.device)
        side.wait_stream(torch.cuda.current_stream(cache.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                self._run(step, cache, kv_length)
        torch.cuda.current_stream(cache.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            step.logits = self._run(step, cache, kv_length)
        step.graph = graph
