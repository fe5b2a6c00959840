"""`kiln serve` on an encoder model: POST /v1/embeddings as users meet it (the real `openai`
client, float and base64, token-id inputs, concurrent clients batched together) and as
attackers do (bad inputs are 400s naming the problem), on the real all-MiniLM-L6-v2 with
sentence-transformers as the reference."""

from __future__ import annotations

import base64
import concurrent.futures

import httpx
import numpy as np
import pytest

from .serving import start_server

SENTENCES = ["A man is eating food.", "A man is riding a horse.", "The girl is carrying a baby.",
             "A monkey is playing drums.", "Two men pushed carts through the woods."]


@pytest.fixture(scope="module")
def server(minilm, tmp_path_factory):
    pytest.importorskip("fastapi")
    server = start_server(tmp_path_factory.mktemp("embed"), "--model", str(minilm),
                          "--served-model-name", "minilm", "--max-embedding-inputs", "8")
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def reference(minilm) -> np.ndarray:
    sentence_transformers = pytest.importorskip("sentence_transformers")
    model = sentence_transformers.SentenceTransformer(str(minilm), device="cpu")
    return model.encode(SENTENCES)


def test_openai_client_gets_sentence_transformers_embeddings(server, reference):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=server.api_key)
    # The client asks for base64 and decodes it.
    answer = client.embeddings.create(model="minilm", input=SENTENCES)
    vectors = np.array([item.embedding for item in answer.data])
    assert [item.index for item in answer.data] == list(range(len(SENTENCES)))
    np.testing.assert_allclose(vectors, reference, atol=2e-5)
    assert answer.usage.prompt_tokens == answer.usage.total_tokens > len(SENTENCES) * 3
    single = client.embeddings.create(model="minilm", input=SENTENCES[1])
    np.testing.assert_allclose(single.data[0].embedding, reference[1], atol=2e-5)


def test_float_and_base64_and_token_ids_agree(server, minilm):
    from tokenizers import Tokenizer

    floats = server.post("/v1/embeddings", {"input": SENTENCES[:2],
                                            "encoding_format": "float"}).json()
    packed = server.post("/v1/embeddings", {"input": SENTENCES[:2],
                                            "encoding_format": "base64"}).json()
    for as_list, as_text in zip(floats["data"], packed["data"], strict=True):
        decoded = np.frombuffer(base64.b64decode(as_text["embedding"]), dtype="<f4")
        np.testing.assert_array_equal(decoded, np.array(as_list["embedding"], dtype=np.float32))
    tokenizer = Tokenizer.from_file(str(minilm / "tokenizer.json"))
    tokenizer.no_padding()  # the file pads to 128
    ids = [encoding.ids for encoding in tokenizer.encode_batch(SENTENCES[:2])]
    by_ids = server.post("/v1/embeddings", {"input": ids, "encoding_format": "float"}).json()
    np.testing.assert_allclose([d["embedding"] for d in by_ids["data"]],
                               [d["embedding"] for d in floats["data"]], atol=1e-6)
    one_row = server.post("/v1/embeddings", {"input": ids[0]}).json()
    assert len(one_row["data"]) == 1 and one_row["usage"]["prompt_tokens"] == len(ids[0])


def test_concurrent_clients_get_their_own_vectors(server, reference):
    def ask(index: int) -> list[float]:
        body = {"input": SENTENCES[index % len(SENTENCES)], "encoding_format": "float"}
        return server.post("/v1/embeddings", body).json()["data"][0]["embedding"]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(48)))
    for index, vector in enumerate(answers):
        np.testing.assert_allclose(vector, reference[index % len(SENTENCES)], atol=2e-5)
    metrics = server.metrics()
    assert metrics["kiln_embedding_inputs_total"] >= 48


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"input": []}, "input", "empty"),
    ({"input": [""]}, "input", "empty string"),
    ({"input": [[]]}, "input", "no token ids"),
    ({"input": [[101, 999999]]}, "input", "outside the vocabulary"),
    ({"input": [[101] * 600]}, "input", "at most"),
    ({"input": ["a"] * 9}, "input", "--max-embedding-inputs"),
    ({"input": "a", "dimensions": 12}, "dimensions", "384 dimensions"),
    ({"input": "a", "model": "other"}, "model", "does not exist"),
    ({"input": "a", "encoding_format": "int8"}, "encoding_format", ""),
    ({"input": "a", "truncate": True}, "truncate", "unknown field"),
    ({"input": [1.5]}, "input", ""),
    ({"input": [True]}, "input", ""),
])
def test_bad_inputs_are_400s_naming_the_problem(server, body, param, words):
    answer = server.post("/v1/embeddings", body)
    error = answer.json()["error"]
    assert answer.status_code == (404 if param == "model" else 400), error
    assert error["param"] == param and words in error["message"]


def test_the_generation_endpoints_point_to_embeddings(server):
    answer = server.post("/v1/completions", {"prompt": "hello", "max_tokens": 2})
    assert answer.status_code == 400 and "/v1/embeddings" in answer.json()["error"]["message"]
    models = httpx.get(server.url + "/v1/models", headers=server.headers, timeout=10).json()
    assert models["data"][0]["id"] == "minilm"
    assert models["data"][0]["embedding_dimensions"] == 384
