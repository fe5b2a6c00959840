"""A decode step with static shapes, captured once and replayed.

At batch 1 a decode step runs a few hundred small ops; the Python and dispatch around them,
not the weights, then set much of the speed. Captured once, a step replays without them:

- on CUDA as a CUDA graph (no kernel launches from the host);
- on CPU as a TorchScript trace (no Python between ops: 1.2-1.4x faster decode steps for
  Pythia-410m/1b int8 on a 2-core Xeon). `torch.jit.trace` is deprecated; where it is gone
  or fails, the step runs eagerly at the same static shapes.

A capture fixes every shape (and, for a graph, every address), so the step runs on:

- a bucketed batch: B rows run as the next power of two; the extra rows are padding that
  writes to the cache's scratch column and whose logits are dropped;
- a bucketed attention length: keys are read up to a multiple of KV_BUCKET columns (the
  mask hides columns past each row's position, so reading more changes nothing);
- static input buffers (token ids, positions) copied in before each replay.

Rows are the dense slots 0..B-1 of the engine's slot pool (the engine keeps used slots
dense), so the captures read the one KV cache in place, with no gather of slots. One capture
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
WARMUP_RUNS = 2  # before capture: cuBLAS workspaces, Triton autotuning, lazy tables


def batch_bucket(rows: int) -> int:
    """The power of two >= rows that the step runs at."""
    return 1 << max(rows - 1, 0).bit_length()


def kv_bucket(kv_length: int, max_length: int) -> int:
    return min(-(-kv_length // KV_BUCKET) * KV_BUCKET, max_length)


@dataclass
class _Step:
    ids: torch.Tensor  # [B', 1] static token ids
    positions: torch.Tensor  # [B', 1] static cache positions
    slots: torch.Tensor | None = None  # [B'] static slot of each row (slot-addressed steps)
    logits: torch.Tensor | None = None  # [B', V] written by every run
    graph: object | None = None  # torch.cuda.CUDAGraph when captured
    traced: object | None = None  # a TorchScript function of (ids, positions, *keys, *values)


class _CacheView:
    """What Decoder.forward reads of a KV cache: the per-layer key and value tensors."""

    def __init__(self, keys, values) -> None:
        self.keys, self.values = keys, values


class _StepModule(nn.Module):
    """The decode step as a module of flat tensor inputs, which is what tracing needs."""

    def __init__(self, model: nn.Module, kv_length: int, addressed: bool) -> None:
        super().__init__()
        self.model = model
        self.kv_length = kv_length
        self.addressed = addressed
        self.layers = len(model.layers)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, *rest: torch.Tensor):
        slots, kv = (rest[0], rest[1:]) if self.addressed else (None, rest)
        cache = _CacheView(kv[: self.layers], kv[self.layers:])
        return self.model(ids, positions, cache, kv_length=self.kv_length, slots=slots,
                          decode=True)[:, -1]


def default_capture(device: torch.device) -> str | None:
    if device.type == "cuda":
        return "cuda_graph"
    return "trace" if hasattr(torch.jit, "trace") else None


class StaticDecodeStep:
    """`step(ids, positions, cache, kv_length)` == `model(ids[:, None], positions[:, None],
    cache, kv_length=kv_length)[:, -1]`, run at static shapes (and replayed on CUDA).

    With `slots`, rows name their cache slot (several rows may share one: speculative
    verification runs a sequence's proposals as rows of its slot); such steps are captured
    separately, at power-of-two row counts that may exceed the slots."""

    def __init__(self, model: torch.nn.Module, capture: str | None) -> None:
        if capture not in ("cuda_graph", "trace", None):
            raise ValueError(f"capture must be 'cuda_graph', 'trace' or None, got {capture!r}")
        self.model = model
        self.capture = capture
        self._steps: dict[tuple[int, int, bool], _Step] = {}
        self._cache = None  # the KV cache the steps were built for
        self._pool = None

    def step(self, ids: torch.Tensor, positions: torch.Tensor, cache, kv_length: int,
             slots: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, V] of one decode step; valid until the next call."""
        rows = ids.shape[0]
        addressed = slots is not None
        if addressed:
            bucket = batch_bucket(rows)
        else:
            bucket = min(batch_bucket(rows), cache.num_slots)  # a bucket never exceeds the slots
            if rows > cache.num_slots:
                raise ValueError(f"a batch of {rows} rows needs {rows} slots but the cache has "
                                 f"{cache.num_slots}")
        if cache is not self._cache:  # graphs hold the old cache's addresses
            self.reset()
            self._cache = cache
        key = (bucket, kv_bucket(kv_length, cache.max_length), addressed)
        step = self._steps.get(key)
        if step is None:
            step = self._steps[key] = self._build(key, cache)
        extra = (slots,) if addressed else ()
        if step.traced is not None and rows == bucket:  # a trace reads its inputs directly
            step.logits = step.traced(ids.view(-1, 1), positions.view(-1, 1), *extra,
                                      *cache.keys, *cache.values)
            return step.logits
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
        elif step.traced is not None:
            static_extra = (step.slots,) if addressed else ()
            step.logits = step.traced(step.ids, step.positions, *static_extra, *cache.keys,
                                      *cache.values)
        else:
            step.logits = self._run(step, cache, key[1])
        return step.logits[:rows]

    def build(self, rows: int, kv_length: int, cache) -> None:
        """Capture the step for `rows` rows and `kv_length` columns now, if not yet done (a
        trace takes ~0.7 s for SmolLM2 on 2 cores: better at start than inside a stream)."""
        if cache is not self._cache:
            self.reset()
            self._cache = cache
        key = (min(batch_bucket(rows), cache.num_slots), kv_bucket(kv_length, cache.max_length),
               False)
        if key not in self._steps:
            self._steps[key] = self._build(key, cache)

    def reset(self) -> None:
        """Drop every graph (their memory returns to the allocator) and the cache they use."""
        self._steps.clear()
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
        elif self.capture == "trace":
            self._trace(step, cache, kv_length)
        return step

    def _trace(self, step: _Step, cache, kv_length: int) -> None:
        addressed = step.slots is not None
        module = _StepModule(self.model, kv_length, addressed)
        inputs = (step.ids, step.positions, *((step.slots,) if addressed else ()), *cache.keys,
                  *cache.values)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # deprecation, and Python values made constants
                traced = torch.jit.trace(module, inputs, check_trace=False)
        except Exception as error:  # noqa: BLE001 - any failure: run eagerly, as before
            warnings.warn(f"kiln: decode steps run eagerly, tracing failed: {error}",
                          RuntimeWarning, stacklevel=3)
            self.capture = None
            return
        # TorchScript profiles a function's first runs and optimizes it then (~0.3 s for
        # SmolLM2): done here, on padding rows that write only the scratch column.
        for _ in range(WARMUP_RUNS + 1):
            traced(*inputs)
        step.traced = traced

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
