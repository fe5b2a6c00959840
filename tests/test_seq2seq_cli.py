"""`kiln translate` and `kiln embed` against the Python classes they stand on (and, for
embed, sentence-transformers on the real all-MiniLM-L6-v2)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

import kiln
from kiln.cli import main

from .conftest import word_level_tokenizer
from .test_translator import EOS, VOCAB, tiny_seq2seq


@pytest.fixture(scope="module", params=["bart", "m2m_100"])
def translator_folder(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    tiny_seq2seq(request.param).save_pretrained(folder)
    word_level_tokenizer(VOCAB, folder, bos=0, eos=EOS)
    return request.param, folder


def _direct(folder, tokens: list[str], prefix: list[str] | None = None) -> str:
    result = kiln.Translator(folder, compute_type="float32").translate_batch(
        [tokens], target_prefix=[prefix] if prefix else None, beam_size=1,
        max_decoding_length=8)[0].hypotheses[0]
    return " ".join(result[len(prefix or []):])


def test_translate_prints_what_the_translator_gives(translator_folder, capsys, monkeypatch):
    family, folder = translator_folder
    texts = ["t5 t9 t40 t2", "t11 t2"]
    assert main(["translate", "--model", str(folder), "--compute-type", "float32",
                 "--beam-size", "1", "--max-decoding-length", "8", *texts]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [_direct(folder, text.split()) for text in texts]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(texts) + "\n"))  # or from stdin
    assert main(["translate", "--model", str(folder), "--compute-type", "float32",
                 "--beam-size", "1", "--max-decoding-length", "8"]) == 0
    assert capsys.readouterr().out.splitlines() == lines
    if family == "m2m_100":  # NLLB-style codes are the tokens forced first
        assert main(["translate", "--model", str(folder), "--compute-type", "float32",
                     "--beam-size", "1", "--max-decoding-length", "8", "--src-lang", "t3",
                     "--tgt-lang", "t40", texts[0]]) == 0
        assert capsys.readouterr().out.splitlines() == [
            _direct(folder, texts[0].split(), ["t40"])]


def test_translate_refuses_half_a_language_pair(translator_folder, capsys):
    _, folder = translator_folder
    assert main(["translate", "--model", str(folder), "--src-lang", "en", "t5"]) == 2
    assert "--tgt-lang" in capsys.readouterr().err


def test_embed_prints_sentence_transformers_vectors(minilm, capsys):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    texts = ["A man is eating food.", "A monkey is playing drums."]
    reference = sentence_transformers.SentenceTransformer(str(minilm), device="cpu").encode(texts)
    assert main(["embed", "--model", str(minilm), "--compute-type", "float32", *texts]) == 0
    vectors = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    np.testing.assert_allclose(vectors, reference, atol=2e-5)
    assert main(["embed", "--model", str(minilm), "--no-normalize", texts[0]]) == 0
    raw = np.array(json.loads(capsys.readouterr().out))
    assert abs(np.linalg.norm(raw) - 1) > 1e-3  # all-MiniLM normalizes; this did not


def test_embed_of_a_decoder_names_the_right_class(tmp_path, capsys):
    from .conftest import save_hf_model, tiny_gpt_neox

    folder = save_hf_model(tiny_gpt_neox(), tmp_path / "neox", tokenizer_vocab=96)
    assert main(["embed", "--model", str(folder), "x"]) == 2
    assert "kiln.Generator" in capsys.readouterr().err
