"""repetition_penalty against CTranslate2 on a tiny GQA Llama (float32): same ids, same scores.

CTranslate2's rule (src/decoding_utils.cc RepetitionPenalty::apply, src/decoding.cc
GreedySearch/BeamSearch::search, src/models/language_model.cc run_generation): the penalty
rescales the raw logits of every distinct id in the row's `alive_seq` (a logit < 0 is
multiplied by the penalty, else divided), before the min_length/suppression masks and the
log-softmax, so the returned score is the log-prob of the penalized distribution. `alive_seq`
holds the tokens decoded after the start token: the prompt after its first token when it is
decoded as a forced prefix (include_prompt_in_result=True), then the generated tokens. The
start token and a static prompt are never penalized; with include_prompt_in_result=False the
prompt is prefilled and only generated tokens count.
"""

from __future__ import annotations

import pytest

import kiln
from kiln.bench.ct2_convert import convert_with_ctranslate2
from kiln.generation import requests

from .conftest import random_prompt, save_hf_model
from .test_families import LLAMA, build

ctranslate2 = pytest.importorskip("ctranslate2")
VOCAB = 96
PROMPTS = [[5, 6, 7, 5, 6, 5, 5], [1, 9, 9, 9, 8, 8, 9], random_prompt(10, 20, seed=4)]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("repetition-penalty")
    settings = dict(LLAMA)
    assert settings["num_key_value_heads"] < settings["num_attention_heads"]  # GQA
    source = save_hf_model(build("llama", settings, seed=4), root / "hf", tokenizer_vocab=VOCAB)
    peer = ctranslate2.Generator(str(convert_with_ctranslate2(source, root / "ct2")))
    return kiln.Generator(kiln.convert(source, root / "kiln")), peer


def tokens(prompt):
    return [f"t{i}" for i in prompt]


CASES = {
    "greedy": dict(),
    "greedy-below-one": dict(repetition_penalty=0.7),
    "greedy-min-length-end": dict(end_token=["t9", "t15"], min_length=4),
    "greedy-static-prompt": dict(static_prompt=["t5", "t9", "t5"]),
    "greedy-ngram": dict(no_repeat_ngram_size=3),
    "greedy-prompt-lookup": dict(kiln=dict(prompt_lookup=True, num_speculative_tokens=3)),
    "beam": dict(beam_size=3, num_hypotheses=2),
    "beam-min-length-end": dict(beam_size=2, end_token=["t9", "t15"], min_length=3,
                                length_penalty=0.5),
}


@pytest.mark.parametrize("include_prompt", [False, True], ids=["new-only", "with-prompt"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_scores_and_ids_match_ctranslate2(pair, name, include_prompt):
    generator, peer = pair
    options = dict(max_length=20, end_token=[], repetition_penalty=1.3, return_scores=True,
                   include_prompt_in_result=include_prompt)
    options.update(CASES[name])
    kiln_only = options.pop("kiln", {})  # options CTranslate2 does not have
    ours = generator.generate_batch([tokens(p) for p in PROMPTS], **options, **kiln_only)
    for prompt, result in zip(PROMPTS, ours, strict=True):
        # One prompt per call: see test_ctranslate2_penalizes_the_rest_of_a_longer_prompt.
        theirs = peer.generate_batch([tokens(prompt)], **options)[0]
        assert result.sequences_ids == theirs.sequences_ids
        assert result.scores == pytest.approx(theirs.scores, abs=1e-5)
    plain = generator.generate_batch([tokens(p) for p in PROMPTS],
                                     **dict(options, repetition_penalty=1.0), **kiln_only)
    assert any(abs(a.scores[0] - b.scores[0]) > 1e-2 for a, b in zip(ours, plain, strict=True))


@pytest.mark.parametrize("include_prompt", [False, True], ids=["new-only", "with-prompt"])
def test_step_log_probs_match_ctranslate2(pair, include_prompt):
    """Each token's log-prob is taken after the penalty (CTranslate2's per-step score)."""
    generator, peer = pair
    prompt = tokens(PROMPTS[0])
    options = dict(max_length=12, end_token=[], repetition_penalty=1.3)
    theirs = list(peer.generate_tokens(prompt, return_log_prob=True, **options))
    ours = list(generator.generate_tokens(prompt, **options))
    assert [step.token_id for step in ours] == [step.token_id for step in theirs]
    assert [step.log_prob for step in ours] == pytest.approx(
        [step.log_prob for step in theirs], abs=1e-5)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_ctranslate2_penalizes_the_rest_of_a_longer_prompt(pair, monkeypatch, beam_size):
    """kiln's rows never depend on each other, so kiln matches CTranslate2 run one prompt per
    call. CTranslate2 itself, with include_prompt_in_result=False, prefills only the shortest
    prompt's length minus one of every prompt in the batch (language_model.cc run_generation);
    the rest of a longer prompt is decoded as a forced prefix and so enters the penalized
    history: its tokens after index len(shortest) - 1."""
    generator, peer = pair
    prompts = [[5, 6, 7, 5, 6, 5, 5, 9], [5, 6, 6], [9, 5, 6, 7, 5]]
    options = dict(max_length=16, end_token=[], repetition_penalty=1.3, return_scores=True,
                   include_prompt_in_result=False, beam_size=beam_size)
    batched = peer.generate_batch([tokens(p) for p in prompts], **options)
    shortest = min(map(len, prompts))
    monkeypatch.setattr(requests.Request, "history_prefix",
                        property(lambda request: request.prompt_ids[shortest:]))
    for prompt, theirs in zip(prompts, batched, strict=True):
        emulated = generator.generate_batch([tokens(prompt)], **options)[0]
        assert emulated.sequences_ids == theirs.sequences_ids
        assert emulated.scores == pytest.approx(theirs.scores, abs=1e-5)
