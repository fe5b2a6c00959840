"""kiln's float32 GPT-NeoX against transformers' GPTNeoXForCausalLM."""

from __future__ import annotations

import json

import pytest
import torch

import kiln
from kiln.conversion.archs import get_adapter

from .conftest import assert_faithful, random_prompt, save_hf_model, tiny_gpt_neox

CONFIGS = {
    "parallel-rotary0.25-padded-vocab": dict(use_parallel_residual=True, rotary_pct=0.25),
    "sequential-rotary1.0-8-heads": dict(use_parallel_residual=False, rotary_pct=1.0,
                                         num_attention_heads=8),
    "parallel-rotary1.0-2-heads-tanh": dict(use_parallel_residual=True, rotary_pct=1.0,
                                            num_attention_heads=2, hidden_act="gelu_new"),
    "sequential-rotary0.25-base5000-no-attn-bias": dict(
        use_parallel_residual=False, rotary_pct=0.25, rotary_emb_base=5000,
        attention_bias=False, num_hidden_layers=3),
}
TOKENIZER_VOCAB = 90  # the embedding has 96 rows: 6 padded ids must never be generated


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    model = tiny_gpt_neox(seed=len(request.param), **CONFIGS[request.param])
    source = save_hf_model(model, root / "hf", tokenizer_vocab=TOKENIZER_VOCAB)
    return model, kiln.Generator(kiln.convert(source, root / "kiln"))


def test_logits_and_greedy_tokens_match_transformers(pair):
    model, generator = pair
    assert_faithful(model, generator, TOKENIZER_VOCAB)


def test_padded_vocabulary_is_never_sampled(pair):
    _, generator = pair
    prompt = random_prompt(8, TOKENIZER_VOCAB, seed=3)
    results = generator.generate_batch([prompt] * 4, max_length=64, end_token=[],
                                       include_prompt_in_result=False, sampling_topk=0,
                                       sampling_temperature=5.0, seed=0)
    assert max(max(r.sequences_ids[0]) for r in results) < TOKENIZER_VOCAB


@pytest.mark.parametrize("keys", ["old", "new-top-level", "rope_parameters"])
def test_config_key_generations_give_the_same_spec(keys):
    base = dict(model_type="gpt_neox", vocab_size=96, hidden_size=64, num_hidden_layers=2,
                num_attention_heads=4, intermediate_size=128, max_position_embeddings=128)
    variants = {
        "old": dict(rotary_pct=0.25, rotary_emb_base=5000),
        "new-top-level": dict(partial_rotary_factor=0.25, rope_theta=5000),
        "rope_parameters": dict(rope_parameters=dict(rope_type="default",
                                                     partial_rotary_factor=0.25,
                                                     rope_theta=5000.0)),
    }
    spec = get_adapter("gpt_neox").spec_from_config({**base, **variants[keys]}, None)
    assert (spec.rotary_dim, spec.rotary_base) == (4, 5000.0)


def test_old_config_file_matches_transformers(tmp_path):
    """A checkpoint whose config.json uses pre-transformers-5 rotary keys (real Pythia)."""
    model = tiny_gpt_neox(seed=7, rotary_pct=0.5, rotary_emb_base=2000)
    source = save_hf_model(model, tmp_path / "hf", tokenizer_vocab=96)
    config = json.loads((source / "config.json").read_text())
    del config["rope_parameters"]
    config.update(rotary_pct=0.5, rotary_emb_base=2000)
    (source / "config.json").write_text(json.dumps(config))
    generator = kiln.Generator(kiln.convert(source, tmp_path / "kiln"))
    prompt = random_prompt(30, 96, seed=4)
    with torch.inference_mode():
        expected = model(torch.tensor([prompt])).logits
    assert (generator.forward_batch([prompt]) - expected).abs().max().item() <= 1e-4
