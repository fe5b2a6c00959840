"""kiln.Encoder against its references: transformers' BERT, RoBERTa, XLM-R and DistilBERT
(hidden states and pooler output, float32 and int8), CTranslate2's int8 Encoder as the peer for
quantization error, and sentence-transformers on the real all-MiniLM-L6-v2."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import kiln

from .conftest import save_hf_model, widen_init

VOCAB = 96  # the tokenizer covers every embedding row (CTranslate2 checks it)


def tiny_encoder(family: str, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=96, max_position_embeddings=70)
    if family == "distilbert":
        config = transformers.DistilBertConfig(dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                                               **common)
        model = transformers.DistilBertModel(config)
    else:
        config_class, model_class = {
            "bert": (transformers.BertConfig, transformers.BertModel),
            "roberta": (transformers.RobertaConfig, transformers.RobertaModel),
            "xlm-roberta": (transformers.XLMRobertaConfig, transformers.XLMRobertaModel),
        }[family]
        extra = {"pad_token_id": 1} if family != "bert" else {}
        config = config_class(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=128, type_vocab_size=2, **common, **extra)
        model = model_class(config)
    return widen_init(model.eval(), embed_std=0.5, std=0.1)


@pytest.fixture(scope="module", params=["bert", "roberta", "xlm-roberta", "distilbert"])
def family_model(request, tmp_path_factory):
    model = tiny_encoder(request.param)
    folder = save_hf_model(model, tmp_path_factory.mktemp(request.param) / "hf",
                           tokenizer_vocab=VOCAB)
    return request.param, model, folder


def ragged_batch(seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = [5, 17, 1, 40, 23]
    return [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in lengths]


def reference(model, rows: list[list[int]], family: str, types: list[list[int]] | None = None):
    width = max(len(row) for row in rows)
    pad = model.config.pad_token_id if family != "bert" else 0
    ids = torch.full((len(rows), width), pad or 0)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, :len(row)] = torch.tensor(row)
        mask[index, :len(row)] = 1
    kwargs = {}
    if types is not None:
        token_types = torch.zeros_like(ids)
        for index, row in enumerate(types):
            token_types[index, :len(row)] = torch.tensor(row)
        kwargs["token_type_ids"] = token_types
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, **kwargs)
    pooled = getattr(out, "pooler_output", None)
    return out.last_hidden_state, pooled, mask


def test_float32_matches_transformers(family_model):
    family, model, folder = family_model
    encoder = kiln.Encoder(folder, compute_type="float32")
    rows = ragged_batch()
    states, pooled, mask = reference(model, rows, family)
    output = encoder.forward_batch(rows)
    real = mask.bool()
    assert torch.allclose(output.last_hidden_state[real], states[real], atol=2e-5, rtol=1e-4)
    if family == "distilbert":
        assert output.pooler_output is None
    else:
        assert torch.allclose(output.pooler_output, pooled, atol=2e-5, rtol=1e-4)


def test_token_types_are_used(family_model):
    family, model, folder = family_model
    if family == "distilbert":
        pytest.skip("DistilBERT has no token types")
    encoder = kiln.Encoder(folder, compute_type="float32")
    rows = ragged_batch(1)
    types = [[0] * (len(row) // 2) + [1] * (len(row) - len(row) // 2) for row in rows]
    states, _, mask = reference(model, rows, family, types)
    output = encoder.forward_batch(rows, token_type_ids=types)
    real = mask.bool()
    assert torch.allclose(output.last_hidden_state[real], states[real], atol=2e-5, rtol=1e-4)


def test_a_row_does_not_depend_on_its_neighbours(family_model):
    _, _, folder = family_model
    encoder = kiln.Encoder(folder, compute_type="float32")
    rows = ragged_batch(2)
    together = encoder.forward_batch(rows).last_hidden_state
    for index, row in enumerate(rows):
        alone = encoder.forward_batch([row]).last_hidden_state[0]
        assert torch.allclose(together[index, :len(row)], alone, atol=1e-5)


def test_token_strings_and_id_tensors(family_model):
    _, _, folder = family_model
    encoder = kiln.Encoder(folder, compute_type="float32")
    rows = ragged_batch(3)
    by_ids = encoder.forward_batch(rows).last_hidden_state
    by_tokens = encoder.forward_batch([[f"t{i}" for i in row] for row in rows]).last_hidden_state
    width = max(len(row) for row in rows)
    tensor = torch.zeros(len(rows), width, dtype=torch.long)
    for index, row in enumerate(rows):
        tensor[index, :len(row)] = torch.tensor(row)
    by_tensor = encoder.forward_batch(tensor, lengths=[len(r) for r in rows]).last_hidden_state
    assert torch.equal(by_ids, by_tokens)
    for index, row in enumerate(rows):  # (what stands in the padding is the caller's)
        assert torch.equal(by_ids[index, :len(row)], by_tensor[index, :len(row)])


def int8_error(states: torch.Tensor, reference_states: torch.Tensor, mask: torch.Tensor) -> float:
    real = mask.bool()
    diff = (states[real] - reference_states[real]).norm() / reference_states[real].norm()
    return float(diff)


def test_int8_loses_no_more_than_ctranslate2(family_model, tmp_path):
    family, model, folder = family_model
    if family == "distilbert":
        pytest.skip("CTranslate2 converts no DistilBERT encoder")
    ctranslate2 = pytest.importorskip("ctranslate2")
    rows = ragged_batch(4)
    states, _, mask = reference(model, rows, family)
    kiln_int8 = kiln.Encoder(folder, compute_type="int8").forward_batch(rows).last_hidden_state
    ct2_folder, source = tmp_path / "ct2", tmp_path / "hf"
    shutil.copytree(folder, source)
    # CTranslate2's converter reads a key newer transformers no longer write
    config = json.loads((source / "config.json").read_text())
    config.setdefault("position_embedding_type", "absolute")
    (source / "config.json").write_text(json.dumps(config))
    ctranslate2.converters.TransformersConverter(str(source)).convert(str(ct2_folder),
                                                                      quantization="int8")
    peer = ctranslate2.Encoder(str(ct2_folder), device="cpu", compute_type="int8")
    ct2_states = torch.as_tensor(np.asarray(peer.forward_batch(rows).last_hidden_state))
    ours, theirs = int8_error(kiln_int8, states, mask), int8_error(ct2_states, states, mask)
    print(f"{family}: relative error of int8 states, kiln {ours:.2e}, CTranslate2 {theirs:.2e}")
    assert ours < 0.05
    assert ours <= theirs * 1.1


def test_bad_input_names_the_problem(family_model):
    _, _, folder = family_model
    encoder = kiln.Encoder(folder, compute_type="float32")
    with pytest.raises(ValueError, match="empty"):
        encoder.forward_batch([[5], []])
    with pytest.raises(ValueError, match="at most"):
        encoder.forward_batch([[5] * 200])
    with pytest.raises(ValueError, match="not in the vocabulary"):
        encoder.forward_batch([["t5", "nope"]])
    with pytest.raises(ValueError, match="token ids"):
        encoder.forward_batch([[5, 10_000]])


def test_a_decoder_folder_is_refused(tmp_path):
    from .conftest import tiny_gpt_neox

    folder = save_hf_model(tiny_gpt_neox(), tmp_path / "neox", tokenizer_vocab=VOCAB)
    with pytest.raises(ValueError, match="kiln.Generator"):
        kiln.Encoder(folder)


# ------------------------------------------------------------ the real all-MiniLM-L6-v2


SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.",
             "The girl is carrying a baby.", "A man is riding a horse.",
             "A woman is playing violin.", "Two men pushed carts through the woods.",
             "A man is riding a white horse on an enclosed ground.",
             "A monkey is playing drums.", "Someone in a gorilla costume is playing a set of drums."
             " " * 3 + "It is loud, and the crowd cheers while the band keeps on playing."]


def test_minilm_embeddings_equal_sentence_transformers(minilm):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    reference_model = sentence_transformers.SentenceTransformer(str(minilm), device="cpu")
    expected = torch.as_tensor(reference_model.encode(SENTENCES, convert_to_numpy=True))
    encoder = kiln.Encoder(minilm, compute_type="float32")
    ours = encoder.embed(SENTENCES)
    assert ours.shape == expected.shape == (len(SENTENCES), 384)
    assert torch.allclose(ours, expected, atol=1e-5)
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(SENTENCES)), atol=1e-5)


def test_minilm_int8_keeps_the_ranking(minilm):
    full = kiln.Encoder(minilm, compute_type="float32").embed(SENTENCES)
    int8 = kiln.Encoder(minilm, compute_type="int8").embed(SENTENCES)
    cosines = (full * int8).sum(-1)
    print(f"int8 vs float32 cosine: min {cosines.min():.5f}")
    assert cosines.min() > 0.995
    similar = full @ full.T
    similar_int8 = int8 @ int8.T
    # each sentence's nearest other sentence is the same
    similar.fill_diagonal_(-1)
    similar_int8.fill_diagonal_(-1)
    assert torch.equal(similar.argmax(-1), similar_int8.argmax(-1))


@pytest.mark.parametrize("compute_type", ["float32", "int8"])
def test_minilm_a_sentence_does_not_depend_on_its_batch(minilm, compute_type):
    """On the real model: a sentence embedded alone and among sentences of other lengths
    (padded together) gets the same vector, to float32 rounding; in int8 too (activations are
    quantized per token)."""
    encoder = kiln.Encoder(minilm, compute_type=compute_type)
    together = encoder.embed(SENTENCES, batch_size=len(SENTENCES))
    for index, sentence in enumerate(SENTENCES):
        alone = encoder.embed([sentence])[0]
        assert torch.allclose(alone, together[index], atol=1e-5), sentence


def test_compat_encoder_returns_hf_hub_ctranslate2s_dict(minilm):
    from kiln.compat import CT2SentenceTransformer, EncoderCT2fromHfHub

    model = EncoderCT2fromHfHub(str(minilm), device="cpu", compute_type="float32")
    single = model.generate("A man is eating food.")  # a str works (a list of one)
    batch = model.generate(SENTENCES[:3])
    assert set(batch) == {"pooler_output", "last_hidden_state", "attention_mask"}
    assert batch["last_hidden_state"].shape[0] == 3 and len(batch["attention_mask"]) == 3
    assert torch.allclose(single["last_hidden_state"][0],
                          batch["last_hidden_state"][0, :single["last_hidden_state"].shape[1]],
                          atol=1e-5)
    transformers = pytest.importorskip("transformers")
    reference_model = transformers.AutoModel.from_pretrained(str(minilm)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm))
    features = tokenizer(SENTENCES[:3], padding=True, return_tensors="pt")
    with torch.inference_mode():
        expected = reference_model(**features)
    mask = features["attention_mask"].bool()
    assert torch.allclose(batch["last_hidden_state"][mask], expected.last_hidden_state[mask],
                          atol=1e-4)
    assert torch.allclose(batch["pooler_output"], expected.pooler_output, atol=1e-4)
    with_tokenizer = EncoderCT2fromHfHub(str(minilm), device="cpu", compute_type="float32",
                                         tokenizer=tokenizer)
    assert torch.allclose(with_tokenizer.generate(SENTENCES[:3])["pooler_output"],
                          batch["pooler_output"])
    sentence_model = CT2SentenceTransformer(str(minilm), compute_type="float32")
    vectors = sentence_model.encode(SENTENCES)
    assert vectors.shape == (len(SENTENCES), sentence_model.get_sentence_embedding_dimension())
    assert torch.allclose(torch.as_tensor(vectors), model.model.embed(SENTENCES))


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_a_ctranslate2_encoder_folder_is_read_in_place(family_model, tmp_path, quantization):
    family, model, folder = family_model
    if family == "distilbert":
        pytest.skip("CTranslate2 converts no DistilBERT encoder")
    ctranslate2 = pytest.importorskip("ctranslate2")
    source = tmp_path / "hf"
    shutil.copytree(folder, source)
    config = json.loads((source / "config.json").read_text())
    config.setdefault("position_embedding_type", "absolute")
    (source / "config.json").write_text(json.dumps(config))
    ct2_folder = tmp_path / "ct2"
    ctranslate2.converters.TransformersConverter(str(source)).convert(
        str(ct2_folder), quantization=quantization)
    rows = ragged_batch(5)
    states, pooled, mask = reference(model, rows, family)
    encoder = kiln.Encoder(ct2_folder, compute_type="int8" if quantization else "float32")
    output = encoder.forward_batch(rows)
    tokens = encoder.forward_batch([[f"t{i}" for i in row] for row in rows])
    assert torch.equal(output.last_hidden_state, tokens.last_hidden_state)
    real = mask.bool()
    tolerance = 0.1 if quantization else 2e-5
    assert int8_error(output.last_hidden_state, states, mask) < (0.05 if quantization else 1e-5)
    if output.pooler_output is not None:  # (CTranslate2 keeps no pooler for XLM-R)
        assert torch.allclose(output.pooler_output, pooled, atol=tolerance)
    assert torch.allclose(output.last_hidden_state[real], states[real], atol=tolerance, rtol=0.05)
    with pytest.raises(ValueError, match="tokenizer.json"):
        encoder.embed(["t5 t6"])


def test_kiln_convert_writes_an_encoder_folder(minilm, tmp_path):
    import subprocess
    import sys

    output = tmp_path / "kiln"
    subprocess.run([sys.executable, "-m", "kiln", "convert", str(minilm), str(output),
                    "--quantization", "int8"], check=True, capture_output=True, timeout=300)
    converted = kiln.Encoder(output, compute_type="int8").embed(SENTENCES)
    direct = kiln.Encoder(minilm, compute_type="int8").embed(SENTENCES)
    assert torch.equal(converted, direct)  # the same int8 rows, the same pooling
    size = (output / "model.safetensors").stat().st_size
    original = sum(p.stat().st_size for p in minilm.glob("*.safetensors"))
    assert size < 0.4 * original
    with pytest.raises(ValueError, match="kiln.Encoder"):
        kiln.Generator(output)
