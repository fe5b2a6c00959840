"""Speculative decoding with prompt lookup: the same greedy tokens as plain decoding (GPT-NeoX
and Llama, float32 and int8, ragged batches, end tokens and lengths inside an accepted run,
stop strings), and the speculative sampling rule reproduces the target's distribution."""

from __future__ import annotations

import pytest
import torch

import kiln
from kiln.generation.speculation import accept_or_resample, lookup_proposals, sample

from .conftest import random_prompt, save_hf_model, tiny_gpt_neox
from .test_gguf import tiny_llama

VOCAB = 90


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("speculation")
    neox = save_hf_model(tiny_gpt_neox(seed=7, max_position_embeddings=512), root / "neox",
                         tokenizer_vocab=VOCAB)
    llama = save_hf_model(tiny_llama(seed=3, vocab_size=96, max_position_embeddings=512),
                          root / "llama", tokenizer_vocab=VOCAB)
    return {"neox-float32": kiln.convert(neox, root / "neox-float32"),
            "neox-int8": kiln.convert(neox, root / "neox-int8", quantization="int8"),
            "llama-float32": kiln.convert(llama, root / "llama-float32")}


def repetitive_prompt(length: int, seed: int) -> list[int]:
    """Text that repeats itself, so the lookup has something to propose."""
    base = random_prompt(length, VOCAB, seed=seed)
    return base + base + base[: length // 2]


def test_lookup_proposes_what_followed_the_latest_match():
    history = [5, 6, 7, 8, 9, 5, 6, 7, 1, 2, 3, 5, 6, 7]
    assert lookup_proposals(history, 2) == [1, 2]  # the most recent earlier "5 6 7"
    assert lookup_proposals(history, 10) == [1, 2, 3, 5, 6, 7]  # stops at the end of history
    assert lookup_proposals([1, 2, 3, 9, 2, 3], 3) == [9, 2, 3]  # longest suffix match: "2 3"
    assert lookup_proposals([1, 2, 3, 4], 3) == []
    assert lookup_proposals([4, 4], 0) == []


@pytest.mark.parametrize("model", ["neox-float32", "neox-int8", "llama-float32"])
def test_greedy_with_prompt_lookup_gives_plain_greedy_tokens(folders, model):
    generator = kiln.Generator(folders[model], max_batch_size=4)
    prompts = [repetitive_prompt(n, seed=n) for n in (5, 11, 17, 8, 23)]  # ragged
    lengths = [40, 25, 60, 3, 33]

    def run(**options):
        return [r.sequences_ids[0] for r in generator.generate_batch(
            prompts, max_length=60, end_token=[], include_prompt_in_result=False, **options)]

    plain = run()
    speculative = run(prompt_lookup=True, num_speculative_tokens=5)
    assert speculative == plain
    assert run(prompt_lookup=True, num_speculative_tokens=2, adaptive_speculation=True) == plain
    stats = generator.engine.speculation
    assert stats.proposed > 100
    # Verification ran as captured slot-addressed steps (traced on CPU), not eagerly.
    assert True in generator.engine.runner._static_step._traces
    if model.startswith("neox"):  # this model copies its context: most proposals are kept
        assert stats.accepted > 20 and stats.tokens_per_pass > 1.5
    else:  # this one does not: the rejection path, nearly every pass
        assert stats.acceptance_rate < 0.2
    # Lengths landing inside accepted runs: no token past max_length.
    for prompt, length in zip(prompts, lengths, strict=True):
        alone = generator.generate_batch([prompt], max_length=length, end_token=[],
                                         include_prompt_in_result=False)[0].sequences_ids[0]
        fast = generator.generate_batch([prompt], max_length=length, end_token=[],
                                        include_prompt_in_result=False, prompt_lookup=True,
                                        num_speculative_tokens=8)[0].sequences_ids[0]
        assert fast == alone and len(fast) == length


def test_end_token_inside_an_accepted_run_ends_there(folders):
    generator = kiln.Generator(folders["neox-float32"])
    prompt = repetitive_prompt(9, seed=4)
    free = generator.generate_batch([prompt], max_length=40, end_token=[],
                                    include_prompt_in_result=False)[0].sequences_ids[0]
    end = free[12]  # a token the continuation reaches, likely inside a proposed run
    options = dict(max_length=40, end_token=end, include_prompt_in_result=False,
                   return_scores=True)
    plain = generator.generate_batch([prompt], **options)[0]
    fast = generator.generate_batch([prompt], prompt_lookup=True, **options)[0]
    assert fast.sequences_ids == plain.sequences_ids
    assert fast.sequences_ids[0] == free[: free.index(end)]
    assert fast.scores[0] == pytest.approx(plain.scores[0], abs=1e-4)


def test_stop_strings_and_min_length_with_prompt_lookup(folders):
    generator = kiln.Generator(folders["neox-float32"])
    prompt = " ".join(f"t{i}" for i in repetitive_prompt(7, seed=2))
    plain = generator.generate(prompt, max_length=40, include_prompt_in_result=False)
    stop = plain.split()[9]
    for options in (dict(stop=[stop]), dict(min_length=30), dict(repetition_penalty=1.3)):
        expected = generator.generate(prompt, max_length=40, include_prompt_in_result=False,
                                      **options)
        assert generator.generate(prompt, max_length=40, include_prompt_in_result=False,
                                  prompt_lookup=True, **options) == expected


def test_prompt_lookup_is_refused_with_beam_search(folders):
    generator = kiln.Generator(folders["neox-float32"])
    with pytest.raises(kiln.RequestError, match="prompt_lookup"):
        generator.generate_batch([[5, 6, 7]], beam_size=2, prompt_lookup=True)
    with pytest.raises(kiln.RequestError, match="num_speculative_tokens"):
        generator.generate_batch([[5, 6, 7]], prompt_lookup=True, num_speculative_tokens=0)


def _distance(draws: torch.Tensor, p: torch.Tensor) -> float:
    counts = torch.bincount(draws, minlength=p.numel()).double()
    return 0.5 * (counts / counts.sum() - p.double()).abs().sum().item()


def _speculative_draws(p, q, rule, count=20000, seed=0):
    generator = torch.Generator().manual_seed(seed)
    draws = []
    for _ in range(count):
        proposal = sample(q, generator) if q is not None else 2
        draws.append(rule(p, proposal, q, generator)[0])
    return torch.tensor(draws)


def _accept_always(p, proposal, q, generator):  # a wrong rule: keeps every proposal
    return proposal, True


def _resample_from_p(p, proposal, q, generator):  # a wrong rule: residual p instead of p - q
    q_of = 1.0 if q is None else float(q[proposal])
    if torch.rand((), generator=generator).item() * q_of < float(p[proposal]):
        return proposal, True
    return sample(p, generator), False


def test_speculative_sampling_reproduces_the_target_distribution():
    """Over 20,000 draws on a 6-token vocabulary, proposals from q (a draft model) or a
    fixed token (prompt lookup) give tokens distributed as p; broken rules do not."""
    p = torch.tensor([0.05, 0.30, 0.10, 0.25, 0.20, 0.10])
    q = torch.tensor([0.30, 0.05, 0.25, 0.10, 0.10, 0.20])
    for proposer in (q, None):
        assert _distance(_speculative_draws(p, proposer, accept_or_resample), p) < 0.015
        assert _distance(_speculative_draws(p, proposer, _accept_always), p) > 0.1
    assert _distance(_speculative_draws(p, q, _resample_from_p), p) > 0.05


@pytest.fixture(scope="module")
def drafts(tmp_path_factory, folders):
    """Draft models for the tiny GPT-NeoX target: itself (always agrees), a smaller random one
    with the same vocabulary (mostly disagrees), and one with another tokenizer."""
    root = tmp_path_factory.mktemp("drafts")
    small = save_hf_model(tiny_gpt_neox(seed=99, num_hidden_layers=1, max_position_embeddings=512),
                          root / "small", tokenizer_vocab=VOCAB)
    other = save_hf_model(tiny_gpt_neox(seed=5, max_position_embeddings=512), root / "other",
                          tokenizer_vocab=VOCAB - 10)
    return {"self": folders["neox-float32"], "small": kiln.convert(small, root / "small-kiln"),
            "other": kiln.convert(other, root / "other-kiln")}


@pytest.mark.parametrize("draft", ["self", "small"])
def test_greedy_with_a_draft_model_gives_plain_greedy_tokens(folders, drafts, draft):
    target = kiln.Generator(folders["neox-int8"], max_batch_size=3)
    prompts = [random_prompt(n, VOCAB, seed=n) for n in (4, 13, 7, 21)]  # ragged, 4 > 3 slots
    options = dict(max_length=30, end_token=[], include_prompt_in_result=False)
    plain = [r.sequences_ids[0] for r in target.generate_batch(prompts, **options)]
    fast = kiln.Generator(folders["neox-int8"], max_batch_size=3, draft_model=drafts[draft])
    assert [r.sequences_ids[0] for r in fast.generate_batch(
        prompts, num_speculative_tokens=4, **options)] == plain
    stats = fast.engine.speculation
    assert stats.verify_passes > 0
    if draft == "self":  # the float32 target drafting for its int8 self agrees nearly always
        assert stats.acceptance_rate > 0.8 and stats.tokens_per_pass > 3.5
    # An end token and lengths landing inside accepted runs; opting out per request.
    end = plain[1][9]
    for extra in (dict(end_token=end), dict(max_length=5), dict(use_draft_model=False)):
        expected = target.generate_batch(prompts, **{**options, **extra})
        got = fast.generate_batch(prompts, **{**options, **extra})
        assert [r.sequences_ids for r in got] == [r.sequences_ids for r in expected]


def test_sampling_with_a_draft_model_runs_seeded(folders, drafts):
    fast = kiln.Generator(folders["neox-float32"], draft_model=drafts["small"])
    options = dict(max_length=20, end_token=[], include_prompt_in_result=False, sampling_topk=0,
                   sampling_temperature=0.9, seed=3)
    first = fast.generate_batch([[5, 6, 7, 8]], **options)[0].sequences_ids[0]
    assert fast.generate_batch([[5, 6, 7, 8]], **options)[0].sequences_ids[0] == first
    assert len(first) == 20 and max(first) < VOCAB


def test_a_draft_with_another_vocabulary_is_refused(folders, drafts):
    with pytest.raises(kiln.ModelFileError, match="must share the target's tokenizer"):
        kiln.Generator(folders["neox-float32"], draft_model=drafts["other"])


def test_llama_with_a_draft_and_stop_strings(folders, tmp_path):
    """A Llama target with a smaller random Llama as draft (partly agreeing at best): the
    same greedy text as plain decoding, cut at the same stop string."""
    draft = kiln.convert(save_hf_model(tiny_llama(seed=8, vocab_size=96, num_hidden_layers=1,
                                                  max_position_embeddings=512),
                                       tmp_path / "hf", tokenizer_vocab=VOCAB),
                         tmp_path / "draft")
    plain = kiln.Generator(folders["llama-float32"])
    fast = kiln.Generator(folders["llama-float32"], draft_model=draft)
    prompt = " ".join(f"t{i}" for i in random_prompt(6, VOCAB, seed=12))
    free = plain.generate(prompt, max_length=30, include_prompt_in_result=False)
    assert fast.generate(prompt, max_length=30, include_prompt_in_result=False) == free
    stop = free.split()[7]
    expected = plain.generate(prompt, max_length=30, include_prompt_in_result=False, stop=[stop])
    assert fast.generate(prompt, max_length=30, include_prompt_in_result=False,
                         stop=[stop]) == expected
    assert fast.engine.speculation.verify_passes > 0
