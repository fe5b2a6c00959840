"""hf-hub-ctranslate2's classes on kiln, for users who migrate by changing one import line.

    from kiln.compat import GeneratorCT2fromHfHub
    model = GeneratorCT2fromHfHub(model_name_or_path="EleutherAI/pythia-410m",
                                  device="cpu", compute_type="int8")
    outputs = model.generate(text=["def fibonacci(n):"], max_length=64)

Also `TranslatorCT2fromHfHub` and `MultiLingualTranslatorCT2fromHfHub` (kiln.Translator),
`EncoderCT2fromHfHub` and `CT2SentenceTransformer` (kiln.Encoder).

Same constructor and `generate` conventions: token strings in, the first hypothesis decoded
out (prompt included, since include_prompt_in_result=True is the default), a `str` for a
`str` and a list for a list. Asking for CUDA on a machine without it is a clear ValueError
(kiln does not silently move the model to another device).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .generator import Generator


class GeneratorCT2fromHfHub:
    def __init__(self, model_name_or_path: str, device: str = "cuda", device_index: int = 0,
                 compute_type: str = "int8_float16", tokenizer: Any = None,
                 hub_kwargs: dict | None = None, **kwargs: Any) -> None:
        options = _hub_options(hub_kwargs)
        self.model = Generator.from_pretrained(
            model_name_or_path, device=device, device_index=device_index,
            compute_type=compute_type, **options, **kwargs)
        self.tokenizer = tokenizer if tokenizer is not None else self.model.require_tokenizer()

    def _encode(self, text: str, encode_tok_kwargs: dict) -> list[str] | list[int]:
        if hasattr(self.tokenizer, "convert_ids_to_tokens"):  # a transformers tokenizer
            return self.tokenizer.convert_ids_to_tokens(
                self.tokenizer.encode(text, **encode_tok_kwargs))
        return self.tokenizer.encode(text, **encode_tok_kwargs)

    def _decode(self, ids: Sequence[int], decode_tok_kwargs: dict) -> str:
        options = {"skip_special_tokens": False, **decode_tok_kwargs}  # transformers' default
        return self.tokenizer.decode(list(ids), **options)

    def generate(self, text: str | list[str], encode_tok_kwargs: dict | None = None,
                 decode_tok_kwargs: dict | None = None,
                 **generate_batch_kwargs: Any) -> str | list[str]:
        prompts = [text] if isinstance(text, str) else list(text)
        tokens = [self._encode(prompt, dict(encode_tok_kwargs or {})) for prompt in prompts]
        results = self.model.generate_batch(tokens, **generate_batch_kwargs)
        texts = [self._decode(result.sequences_ids[0], dict(decode_tok_kwargs or {}))
                 for result in results]
        return texts[0] if isinstance(text, str) else texts


def _hub_options(hub_kwargs: dict | None) -> dict[str, Any]:
    hub_kwargs = dict(hub_kwargs or {})
    options = {key: hub_kwargs.pop(key) for key in
               ("revision", "cache_dir", "local_files_only", "token") if key in hub_kwargs}
    if "cache_dir" in options:
        options["hub_cache_dir"] = options.pop("cache_dir")
    if hub_kwargs:
        raise ValueError(f"hub_kwargs {sorted(hub_kwargs)} are not supported; supported: "
                         "revision, cache_dir, local_files_only, token")
    return options


class EncoderCT2fromHfHub:
    """hf-hub-ctranslate2's encoder: `generate(text)` returns {"pooler_output",
    "last_hidden_state", "attention_mask"} for the texts, tokenized by the model's tokenizer.
    A `str` works as well as a list (hf-hub-ctranslate2 tokenizes a bare string wrongly)."""

    def __init__(self, model_name_or_path: str, device: str = "cuda", device_index: int = 0,
                 compute_type: str = "int8_float16", tokenizer: Any = None,
                 hub_kwargs: dict | None = None, **kwargs: Any) -> None:
        from .encoder import Encoder

        self.model = Encoder(model_name_or_path, device=device, device_index=device_index,
                             compute_type=compute_type, **_hub_options(hub_kwargs), **kwargs)
        self.tokenizer = tokenizer
        self.device = device

    def _features(self, texts: list[str], encode_tok_kwargs: dict) -> dict[str, list]:
        if self.tokenizer is None:
            return self.model.encode_texts(texts)
        features = self.tokenizer(texts, **encode_tok_kwargs)
        return {name: [list(row) for row in features[name]] for name in features}

    def generate(self, text: str | list[str], encode_tok_kwargs: dict | None = None,
                 decode_tok_kwargs: dict | None = None, **forward_kwargs: Any) -> dict[str, Any]:
        texts = [text] if isinstance(text, str) else list(text)
        features = self._features(texts, dict(encode_tok_kwargs or {}))
        output = self.model.forward_batch(features["input_ids"],
                                          token_type_ids=features.get("token_type_ids"),
                                          **forward_kwargs)
        return {"pooler_output": output.pooler_output,
                "last_hidden_state": output.last_hidden_state,
                "attention_mask": features["attention_mask"]}


class CT2SentenceTransformer:
    """A sentence-transformers model whose transformer runs on kiln:
    `encode(sentences)` returns the embeddings sentence-transformers returns (its pooling and
    normalization, read from the model's files), as a numpy array by default."""

    def __init__(self, model_name_or_path: str, device: str = "cpu", compute_type: str = "int8",
                 hub_kwargs: dict | None = None, **kwargs: Any) -> None:
        from .encoder import Encoder

        self.model = Encoder(model_name_or_path, device=device, compute_type=compute_type,
                             **_hub_options(hub_kwargs), **kwargs)

    def encode(self, sentences: str | list[str], batch_size: int = 32,
               convert_to_numpy: bool = True, convert_to_tensor: bool = False,
               normalize_embeddings: bool = False, **_: Any):
        vectors = self.model.embed(sentences, batch_size=batch_size,
                                   normalize=True if normalize_embeddings else None)
        if convert_to_tensor or not convert_to_numpy:
            return vectors
        return vectors.numpy()

    def get_sentence_embedding_dimension(self) -> int:
        return len(self.model.pooling.modes) * self.model.spec.hidden_size


class TranslatorCT2fromHfHub:
    """hf-hub-ctranslate2's translator: `generate(text, **translate_batch_options)` tokenizes
    with the model's tokenizer (transformers' AutoTokenizer unless one is given), translates
    and decodes the best hypothesis; a `str` for a `str`, a list for a list."""

    def __init__(self, model_name_or_path: str, device: str = "cuda", device_index: int = 0,
                 compute_type: str = "int8_float16", tokenizer: Any = None,
                 hub_kwargs: dict | None = None, **kwargs: Any) -> None:
        from .translator import Translator

        self.model = Translator(model_name_or_path, device=device, device_index=device_index,
                                compute_type=compute_type, **_hub_options(hub_kwargs), **kwargs)
        self.tokenizer = tokenizer if tokenizer is not None else _translation_tokenizer(
            self.model.path)

    def _tokens(self, text: str) -> list[str]:
        return self.tokenizer.convert_ids_to_tokens(self.tokenizer.encode(text))

    def _decode(self, tokens: list[str], decode_tok_kwargs: dict) -> str:
        return self.tokenizer.decode(self.tokenizer.convert_tokens_to_ids(tokens),
                                     **decode_tok_kwargs)

    def generate(self, text: str | list[str], encode_tok_kwargs: dict | None = None,
                 decode_tok_kwargs: dict | None = None, **translate_kwargs: Any):
        texts = [text] if isinstance(text, str) else list(text)
        results = self.model.translate_batch([self._tokens(t) for t in texts],
                                             **translate_kwargs)
        decoded = [self._decode(r.hypotheses[0], dict(decode_tok_kwargs or {})) for r in results]
        return decoded[0] if isinstance(text, str) else decoded


class MultiLingualTranslatorCT2fromHfHub(TranslatorCT2fromHfHub):
    """M2M100 / NLLB: `generate(text, src_lang=[...], tgt_lang=[...])`; the target language
    token is forced first (a target prefix) and left out of the decoded text."""

    def generate(self, text: str | list[str], src_lang: str | list[str] = "en",
                 tgt_lang: str | list[str] = "de", encode_tok_kwargs: dict | None = None,
                 decode_tok_kwargs: dict | None = None, **translate_kwargs: Any):
        texts = [text] if isinstance(text, str) else list(text)
        sources = [src_lang] * len(texts) if isinstance(src_lang, str) else list(src_lang)
        targets = [tgt_lang] * len(texts) if isinstance(tgt_lang, str) else list(tgt_lang)
        if not len(texts) == len(sources) == len(targets):
            raise ValueError(f"unequal lengths: text={len(texts)} src_lang={len(sources)} "
                             f"tgt_lang={len(targets)}")
        if isinstance(self.tokenizer, TokenizerFile):
            raise ImportError("src_lang and tgt_lang need the model's transformers tokenizer: "
                              "pip install transformers sentencepiece")
        tokens = []
        for item, language in zip(texts, sources, strict=True):
            self.tokenizer.src_lang = language
            tokens.append(self._tokens(item))
        prefixes = [[self._language_token(language)] for language in targets]
        results = self.model.translate_batch(tokens, target_prefix=prefixes, **translate_kwargs)
        options = dict(decode_tok_kwargs or {})
        decoded = [self._decode(r.hypotheses[0][1:], options) for r in results]
        return decoded[0] if isinstance(text, str) else decoded

    def _language_token(self, language: str) -> str:
        lookup = getattr(self.tokenizer, "lang_code_to_token", None)
        if lookup and language in lookup:
            return lookup[language]
        token_id = getattr(self.tokenizer, "get_lang_id", None)
        if token_id is not None:
            return self.tokenizer.convert_ids_to_tokens(token_id(language))
        return language  # NLLB: the code is the token (e.g. "deu_Latn")


def _translation_tokenizer(folder):
    """The model's transformers tokenizer, as hf-hub-ctranslate2 loads it; without
    transformers, its tokenizer.json."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        if (folder / "tokenizer.json").is_file():
            return TokenizerFile(folder)
        raise ImportError(f"{folder} has no tokenizer.json: give tokenizer=..., or pip install "
                          "transformers sentencepiece to load the model's own") from None
    return AutoTokenizer.from_pretrained(str(folder))


class TokenizerFile:
    """A model's tokenizer.json with the methods of a transformers tokenizer that the
    translator classes call: enough for them without transformers installed."""

    def __init__(self, folder) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))

    def encode(self, text: str, **_: Any) -> list[int]:
        return self.tokenizer.encode(text).ids

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self.tokenizer.id_to_token(int(i)) for i in ids]

    def convert_tokens_to_ids(self, tokens: Sequence[str]) -> list[int]:
        return [self.tokenizer.token_to_id(token) for token in tokens]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True, **_: Any) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
