"""The static decode step: buckets, padding rows and buffer reuse, run here traced (what CPUs
use) and uncaptured (the code a CUDA graph captures). It must give what eager steps give."""

from __future__ import annotations

import pytest
import torch

import kiln
from kiln.generation import runner as runner_module
from kiln.generation import static_step
from kiln.generation.static_step import StaticDecodeStep, batch_bucket, kv_bucket
from kiln.model.kv_cache import KVCache

from .conftest import random_prompt, save_hf_model, tiny_gpt_neox

VOCAB = 90


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("graphs")
    source = save_hf_model(tiny_gpt_neox(seed=21, max_position_embeddings=640), root / "hf",
                           tokenizer_vocab=VOCAB)
    return (kiln.convert(source, root / "float32"),
            kiln.convert(source, root / "int8", quantization="int8"))


def test_buckets():
    assert [batch_bucket(n) for n in (1, 2, 3, 4, 5, 9, 16, 17)] == [1, 2, 4, 4, 8, 16, 16, 32]
    assert kv_bucket(1, 1000) == 256 and kv_bucket(256, 1000) == 256
    assert kv_bucket(257, 1000) == 512 and kv_bucket(900, 1000) == 1000


@pytest.mark.parametrize("capture", ["trace", None])
@pytest.mark.parametrize("weights", ["float32", "int8"])
@pytest.mark.parametrize("options", [
    dict(max_length=20, end_token=[]),
    dict(max_length=20, min_length=5, end_token=["t9", "t15", "t84", "t23"]),
    dict(max_length=12, sampling_topk=0, sampling_temperature=1.5, seed=4),
])
def test_static_steps_equal_eager_steps(folders, weights, options, capture, monkeypatch):
    float_folder, int8_folder = folders
    monkeypatch.setattr(runner_module, "default_capture", lambda device: capture)
    generator = kiln.Generator(int8_folder if weights == "int8" else float_folder)
    generator.static_decode = False
    options = {"include_prompt_in_result": False, "return_scores": True, **options}
    # 3 rows run as 4 (one padding row), then 5 as 8, then 1; the 5-row batch must not
    # leave positions behind for the later 3-row batch in the same bucket. Rows that finish
    # early leave their slot: the rest run at a smaller bucket.
    batches = [[random_prompt(n, VOCAB, seed=n + 40) for n in lengths]
               for lengths in ((1, 6, 13), (2, 3, 4, 5, 7), (9,), (3, 8, 11))]
    eager = [generator.generate_batch(prompts, **options) for prompts in batches]
    generator.static_decode = True
    static = [generator.generate_batch(prompts, **options) for prompts in batches]
    # fbgemm's float epilogue depends on the row count (4 rows, not 3): int8 scores agree to
    # ~1e-4, float32 ones exactly up to rounding.
    tolerance = 1e-3 if weights == "int8" else 1e-5
    for ours, theirs in zip(static, eager, strict=True):
        assert [r.sequences_ids for r in ours] == [r.sequences_ids for r in theirs]
        assert [r.scores[0] for r in ours] == pytest.approx([r.scores[0] for r in theirs],
                                                            abs=tolerance)
    static_step = generator.engine.runner._static_step
    if capture == "trace":  # one trace served every batch and attention length
        assert list(static_step._traces) == [False] and not static_step._steps
        return
    # The engine's cache never changes, so its steps are kept: only buckets, no raw sizes.
    steps = static_step._steps
    assert {rows for rows, _, _ in steps} <= {1, 2, 4, 8}
    assert {4, 8} <= {rows for rows, _, _ in steps}
    assert not static_step._traces


@pytest.mark.parametrize("capture", ["trace", None])
def test_attention_buckets_past_256_columns(folders, monkeypatch, capture):
    monkeypatch.setattr(runner_module, "default_capture", lambda device: capture)
    generator = kiln.Generator(folders[0])
    prompts = [random_prompt(250, VOCAB, seed=1), random_prompt(5, VOCAB, seed=2)]
    options = dict(max_length=20, end_token=[], include_prompt_in_result=False)
    generator.static_decode = False
    eager = generator.generate_batch(prompts, **options)
    generator.static_decode = True
    built = []
    original = StaticDecodeStep._build
    monkeypatch.setattr(StaticDecodeStep, "_build",
                        lambda self, key, cache: built.append(key) or original(self, key, cache))
    traces = []
    original_trace = StaticDecodeStep._trace_for
    monkeypatch.setattr(StaticDecodeStep, "_trace_for", lambda self, addressed, cache: (
        traces.append(addressed) if addressed not in self._traces else None)
        or original_trace(self, addressed, cache))
    static = generator.generate_batch(prompts, **options)
    assert [r.sequences_ids for r in static] == [r.sequences_ids for r in eager]
    if capture == "trace":  # the trace made at start serves both lengths: nothing to build
        assert built == [] and traces == []
    else:
        assert built == [(2, 256, False), (2, 512, False)]  # crossing 256 columns: one more step


@pytest.mark.parametrize("capture", ["trace", None])
def test_steps_survive_across_requests(folders, monkeypatch, capture):
    monkeypatch.setattr(runner_module, "default_capture", lambda device: capture)
    generator = kiln.Generator(folders[0])
    options = dict(max_length=8, end_token=[], include_prompt_in_result=False)
    generator.generate_batch([random_prompt(4, VOCAB, seed=3)], **options)
    static = generator.engine.runner._static_step
    built = {**static._steps, **static._traces}
    assert len(built) == 1
    generator.generate_batch([random_prompt(100, VOCAB, seed=3)], **options)  # a longer one
    generator.generate_batch([random_prompt(2, VOCAB, seed=3)] * 3, **options)  # more rows
    assert static._cache is generator.engine.pool.cache
    now = {**static._steps, **static._traces}
    if capture is None:  # a new bucket of rows is a new step; the old ones are kept
        assert all(now[k] is built[k] for k in built)
    else:  # one trace for every shape
        assert now.keys() == built.keys() and all(now[k] is built[k] for k in built)


def test_too_few_slots_is_refused(folders):
    generator = kiln.Generator(folders[0])
    cache = KVCache(generator.spec, 2, 16, torch.float32, "cpu")
    step = StaticDecodeStep(generator.model, capture=None)
    with pytest.raises(ValueError, match="a batch of 3 rows needs 3 slots but the cache has 2"):
        step.step(torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long), cache, 4)
    three = KVCache(generator.spec, 3, 16, torch.float32, "cpu")  # 3 rows run as 3, not 4
    assert step.step(torch.zeros(3, dtype=torch.long), torch.full((3,), 16), three, 4).shape[0] == 3
    assert list(step._steps) == [(3, 16, False)]


def test_capture_by_device():
    assert static_step.default_capture(torch.device("cpu")) == "trace"
    assert static_step.default_capture(torch.device("cuda")) == "cuda_graph"
    with pytest.raises(ValueError, match="capture must be"):
        StaticDecodeStep(None, capture=True)


def test_a_failing_trace_falls_back_to_eager_steps(folders, monkeypatch):
    options = dict(max_length=12, end_token=[], include_prompt_in_result=False)
    prompts = [random_prompt(7, VOCAB, seed=8)]
    eager = kiln.Generator(folders[0], static_decode=False).generate_batch(prompts, **options)

    def broken(*args, **kwargs):
        raise RuntimeError("tracing is gone")

    monkeypatch.setattr(torch.jit, "trace", broken)
    with pytest.warns(RuntimeWarning, match="tracing failed: tracing is gone"):
        generator = kiln.Generator(folders[0])  # its thread traces when it starts
        static = generator.generate_batch(prompts, **options)
    assert [r.sequences_ids for r in static] == [r.sequences_ids for r in eager]
    assert generator.engine.runner._static_step.capture is None
