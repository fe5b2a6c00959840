"""Llama / Mistral / Qwen2 and GPT-2 against transformers, through the same decoder."""

from __future__ import annotations

import pytest
import torch

import kiln

from .conftest import assert_faithful, save_hf_model, widen_init

VOCAB = 96
LLAMA = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
             rms_norm_eps=1e-5, rope_theta=500.0, bos_token_id=1, eos_token_id=2)

CASES = {
    "llama-gqa-untied": ("llama", dict(LLAMA)),
    "llama-mha-tied": ("llama", dict(LLAMA, num_key_value_heads=4, tie_word_embeddings=True)),
    "llama-biases-head-dim": ("llama", dict(LLAMA, attention_bias=True, mlp_bias=True,
                                            head_dim=24)),
    "llama-rope-linear": ("llama", dict(LLAMA, rope_scaling=dict(rope_type="linear",
                                                                 factor=4.0))),
    "llama-rope-llama3": ("llama", dict(LLAMA, rope_theta=10000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32))),
    "mistral-sliding-window": ("mistral", dict(LLAMA, sliding_window=8)),
    "qwen2-qkv-bias-tied": ("qwen2", dict(LLAMA, num_key_value_heads=1,
                                          tie_word_embeddings=True)),
    "gpt2-tied": ("gpt2", dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                               n_positions=128, bos_token_id=1, eos_token_id=2)),
    "gpt2-exact-gelu-inner": ("gpt2", dict(vocab_size=VOCAB, n_embd=48, n_layer=3, n_head=2,
                                           n_inner=80, n_positions=96,
                                           activation_function="gelu")),
}


def build(model_type: str, settings: dict, seed: int):
    import transformers

    classes = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
               "mistral": ("MistralConfig", "MistralForCausalLM"),
               "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
               "gpt2": ("GPT2Config", "GPT2LMHeadModel")}
    config_class, model_class = (getattr(transformers, name) for name in classes[model_type])
    torch.manual_seed(seed)
    model = getattr(transformers, model_class.__name__)(config_class(**settings)).eval()
    return widen_init(model)


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    model_type, settings = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    model = build(model_type, settings, seed=len(request.param))
    source = save_hf_model(model, root / "hf", tokenizer_vocab=VOCAB)
    return model, kiln.Generator(kiln.convert(source, root / "kiln"))


def test_logits_and_greedy_tokens_match_transformers(pair):
    model, generator = pair
    assert_faithful(model, generator, VOCAB)


def test_spec_records_the_family_choices(pair):
    model, generator = pair
    spec, config = generator.spec, model.config
    if config.model_type == "gpt2":
        assert (spec.position, spec.tie_word_embeddings) == ("learned", True)
    else:
        assert (spec.norm, spec.gated_mlp, spec.num_kv_heads) == (
            "rmsnorm", True, config.num_key_value_heads)
        assert spec.tie_word_embeddings == config.tie_word_embeddings
    assert ("lm_head.weight" in dict(generator.model.named_parameters())) != \
        spec.tie_word_embeddings
