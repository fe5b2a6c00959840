"""kiln as an lm-evaluation-harness model, against lm-eval's own Hugging Face model on the same
weights: the local tasks in tests/data/lmeval (last word, multiple choice, rolling
log-likelihood, generation) through `lm_eval.simple_evaluate`, item by item."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import kiln

lm_eval = pytest.importorskip("lm_eval")

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["kiln_lastword", "kiln_choice", "kiln_rolling", "kiln_generation"]
TOLERANCE = 1e-4  # float32 log-likelihoods, per item


@pytest.fixture(scope="module")
def smollm2_tokenizer_folder(tmp_path_factory):
    from kiln.conversion.formats.gguf import GGUFCheckpoint
    from kiln.sources.default_model import default_gguf

    try:
        gguf_file = default_gguf()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    folder = tmp_path_factory.mktemp("smollm2-tokenizer")
    GGUFCheckpoint(gguf_file).write_tokenizer(folder, [])
    return folder


@pytest.fixture(scope="module")
def tiny_pair(smollm2_tokenizer_folder, tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer: (HF folder, kiln folder)."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    from .conftest import widen_init

    root = tmp_path_factory.mktemp("lmeval-tiny")
    torch.manual_seed(0)
    model = widen_init(LlamaForCausalLM(LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)).eval(), embed_std=0.1,
        std=0.1)
    hf = root / "hf"
    model.save_pretrained(hf)
    for file in smollm2_tokenizer_folder.iterdir():
        shutil.copy(file, hf / file.name)
    return hf, kiln.convert(hf, root / "kiln")


def evaluate(model: str, model_args: str, tasks: list[str], monkeypatch) -> dict:
    from lm_eval.tasks import TaskManager

    import kiln.lmeval  # noqa: F401  registers "kiln"

    monkeypatch.chdir(ROOT)  # the task files name their data relative to the repository
    return lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=tasks, batch_size=4, log_samples=True,
        task_manager=TaskManager(include_path=str(ROOT / "tests" / "data" / "lmeval")))


def responses(results: dict, task: str) -> list:
    samples = sorted(results["samples"][task], key=lambda sample: sample["doc_id"])
    return [sample["resps"] for sample in samples]


def assert_same_items(kiln_results: dict, hf_results: dict, task: str) -> None:
    ours, theirs = responses(kiln_results, task), responses(hf_results, task)
    assert len(ours) == len(theirs) > 0
    for our_item, their_item in zip(ours, theirs, strict=True):
        for ours_one, theirs_one in zip(our_item, their_item, strict=True):
            value, reference = ours_one[0], theirs_one[0]
            if isinstance(reference, str):  # generation: the same text
                assert value == reference
            elif isinstance(reference, (tuple, list)):  # (log-likelihood, is_greedy)
                assert abs(value[0] - reference[0]) <= TOLERANCE, (task, value, reference)
                assert bool(value[1]) == bool(reference[1])
            else:  # a rolling log-likelihood
                assert abs(value - reference) <= TOLERANCE * max(1.0, abs(reference) / 100)


def assert_same_metrics(kiln_results: dict, hf_results: dict, task: str) -> None:
    ours, theirs = kiln_results["results"][task], hf_results["results"][task]
    for key, reference in theirs.items():
        if isinstance(reference, float) and not key.endswith("_stderr,none"):
            assert math.isclose(ours[key], reference, rel_tol=1e-4, abs_tol=1e-6), key


def test_tiny_model_agrees_with_lm_eval_hf_item_by_item(tiny_pair, monkeypatch):
    hf, folder = tiny_pair
    # A 64-token context: the rolling task takes several windows per text.
    ours = evaluate("kiln", f"model={folder},max_length=64", TASKS, monkeypatch)
    theirs = evaluate("hf", f"pretrained={hf},dtype=float32,max_length=64,device=cpu", TASKS,
                      monkeypatch)
    for task in TASKS:
        assert_same_items(ours, theirs, task)
        assert_same_metrics(ours, theirs, task)


def test_smollm2_agrees_with_lm_eval_hf(default_model_cache, monkeypatch, tmp_path):
    from kiln.bench.models import build_smollm2
    from kiln.sources.default_model import default_model_path

    hf = build_smollm2(tmp_path / "smollm2-hf")
    folder = default_model_path(default_model_cache)
    tasks = ["kiln_lastword", "kiln_choice"]
    ours = evaluate("kiln", f"model={folder},compute_type=float32", tasks, monkeypatch)
    theirs = evaluate("hf", f"pretrained={hf},dtype=float32,device=cpu", tasks, monkeypatch)
    for task in tasks:
        assert_same_items(ours, theirs, task)
        assert_same_metrics(ours, theirs, task)
    # and the model is not guessing: a trained model finds most last words of real text
    assert ours["results"]["kiln_lastword"]["acc,none"] >= 0.15  # chance is ~0


def test_kiln_eval_command_prints_the_table(tiny_pair, monkeypatch, capsys):
    from kiln.cli import main

    _, folder = tiny_pair
    monkeypatch.chdir(ROOT)
    assert main(["eval", str(folder), "--tasks", "kiln_choice", "--include-path",
                 "tests/data/lmeval", "--limit", "6"]) == 0
    printed = capsys.readouterr().out
    assert "kiln_choice" in printed and "acc" in printed
