"""A GGUF file's tokenizer rebuilt from its metadata: a byte-level BPE `tokenizers.Tokenizer`,
tokenizer_config.json (chat template included) and special_tokens_map.json."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...errors import ModelFileError

SUPPORTED_TOKENIZER_MODELS = ("gpt2",)

# llama.cpp token types (llama_token_type / gguf.TokenType)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizers (tokenizer.ggml.pre) whose split is exactly GPT-2's regex (plus the extra steps
# below); any other value is approximated with GPT-2's regex and a warning.
_GPT2_REGEX_PRE = ("default", "gpt2", "gpt-2", "smollm")


class GGUFTokenizer:
    """The tokenizer metadata of one GGUF file: `metadata(key, default)` reads a key, `path`
    names the file in errors."""

    def __init__(self, metadata: Callable[..., Any], path: Path) -> None:
        self.metadata = metadata
        self.path = path

    def _token_strings(self) -> list[str]:
        tokens = self.metadata("tokenizer.ggml.tokens")
        if tokens is None:
            raise ModelFileError(f"{self.path}: the GGUF has no tokenizer (tokenizer.ggml.tokens)")
        return tokens

    def _special_token(self, name: str) -> str | None:
        token_id = self.metadata(f"tokenizer.ggml.{name}_token_id")
        tokens = self._token_strings()
        if token_id is None or not 0 <= int(token_id) < len(tokens):
            return None
        return tokens[int(token_id)]

    def build_tokenizer(self):
        """The GGUF's tokenizer as a `tokenizers.Tokenizer`."""
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

        model_name = self.metadata("tokenizer.ggml.model")
        if model_name not in SUPPORTED_TOKENIZER_MODELS:
            raise ValueError(f"{self.path}: tokenizer model {model_name!r} (tokenizer.ggml.model) is "
                             f"not supported; supported: {', '.join(SUPPORTED_TOKENIZER_MODELS)} "
                             "(byte-level BPE)")
        tokens = self._token_strings()
        types = self.metadata("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
        vocab: dict[str, int] = {}
        for token_id, token in enumerate(tokens):
            vocab.setdefault(token, token_id)  # a repeated string keeps its first id
        merges = [self._split_merge(merge, vocab) for merge in self.metadata("tokenizer.ggml.merges", [])]
        try:
            tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                                             byte_fallback=False))
        except Exception as error:  # tokenizers raises a bare Exception for a bad vocabulary
            raise ModelFileError(f"{self.path}: the GGUF's BPE vocabulary and merges do not fit "
                                 f"together: {error}") from error

        pre = self.metadata("tokenizer.ggml.pre", "default")
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if pre == "smollm":
            tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), byte_level])
        else:
            if pre not in _GPT2_REGEX_PRE:
                warnings.warn(f"{self.path}: GGUF pre-tokenizer {pre!r} is approximated with GPT-2's "
                              "byte-level split; token ids may differ from the original tokenizer",
                              stacklevel=2)
            tokenizer.pre_tokenizer = byte_level
        tokenizer.decoder = decoders.ByteLevel()

        # Control tokens (and the unknown token) are special: matched whole, skipped by
        # decode(skip_special_tokens=True). User-defined tokens are matched whole too but, as in
        # llama.cpp, decoded as text.
        special = [AddedToken(tokens[i], special=True, normalized=False)
                   for i, kind in enumerate(types) if kind in (TOKEN_CONTROL, TOKEN_UNKNOWN)]
        user = [AddedToken(tokens[i], special=False, normalized=False)
                for i, kind in enumerate(types) if kind == TOKEN_USER_DEFINED]
        if special:
            tokenizer.add_special_tokens(special)
        if user:
            tokenizer.add_tokens(user)

        post: list[Any] = [processors.ByteLevel(trim_offsets=False)]
        bos_id = self.metadata("tokenizer.ggml.bos_token_id")
        eos_id = self.metadata("tokenizer.ggml.eos_token_id")
        ends = {name: (tokens[int(token_id)], int(token_id)) for name, token_id, flag in
                (("bos", bos_id, "add_bos_token"), ("eos", eos_id, "add_eos_token"))
                if token_id is not None and 0 <= int(token_id) < len(tokens)
                and self.metadata(f"tokenizer.ggml.{flag}", False)}
        if ends:
            head = [ends["bos"][0]] if "bos" in ends else []
            tail = [ends["eos"][0]] if "eos" in ends else []
            post.append(processors.TemplateProcessing(
                single=[*head, "$A:0", *tail], pair=[*head, "$A:0", *tail, *head, "$B:1", *tail],
                special_tokens=list(ends.values())))
        tokenizer.post_processor = post[0] if len(post) == 1 else processors.Sequence(post)
        return tokenizer

    def _split_merge(self, merge: str, vocab: dict[str, int]) -> tuple[str, str]:
        parts = merge.split(" ")
        if len(parts) == 2:
            return parts[0], parts[1]
        # a token holding a literal space: find the split whose two halves are both tokens
        for index in (i for i, char in enumerate(merge) if char == " "):
            left, right = merge[:index], merge[index + 1:]
            if left in vocab and right in vocab:
                return left, right
        raise ModelFileError(f"{self.path}: cannot read the BPE merge {merge!r}")

    def tokenizer_config(self, model_max_length: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """tokenizer_config.json (with the chat template) and special_tokens_map.json."""
        special: dict[str, Any] = {}
        for key, name in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"),
                          ("pad_token", "padding")):
            token = self._special_token(name)
            if token is not None:
                special[key] = token
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "add_bos_token": bool(self.metadata("tokenizer.ggml.add_bos_token", False)),
            "add_eos_token": bool(self.metadata("tokenizer.ggml.add_eos_token", False)),
            "clean_up_tokenization_spaces": False,
            "model_max_length": model_max_length,
        }
        template = self.metadata("tokenizer.chat_template")
        if template is not None:
            config["chat_template"] = template
        return config, special
