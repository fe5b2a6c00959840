"""The `tokenizers` library behind a small interface: text <-> ids <-> token strings."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer as _FastTokenizer

TOKENIZER_FILE = "tokenizer.json"


def check_text(text: object, what: str = "prompt") -> str:
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, got {type(text).__name__}")
    if not text:
        raise ValueError(f"{what} is empty; give at least one character")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"{what} is not valid Unicode (a lone surrogate at index "
                         f"{error.start}); encode it properly before passing it") from error
    return text


class Tokenizer:
    def __init__(self, tokenizer: _FastTokenizer) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_folder(cls, folder: Path) -> Tokenizer | None:
        path = Path(folder) / TOKENIZER_FILE
        if not path.is_file():
            return None
        return cls(_FastTokenizer.from_file(str(path)))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(check_text(text),
                                      add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tokenizer.id_to_token(token_id)

    def tokens_to_ids(self, tokens: Sequence[str]) -> list[int]:
        ids = [self._tokenizer.token_to_id(token) for token in tokens]
        unknown = [token for token, token_id in zip(tokens, ids, strict=True) if token_id is None]
        if unknown:
            raise ValueError(f"tokens not in the vocabulary: {unknown[:5]}; give token strings "
                             "of this model's tokenizer, or token ids")
        return ids

    def ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self._tokenizer.id_to_token(token_id) or "" for token_id in ids]


class StreamingDetokenizer:
    """Turns a stream of token ids into text pieces, never emitting half a character.

    Decoding token by token breaks multi-byte characters (one CJK character or emoji can
    span several byte-level tokens) and drops the spaces some decoders add between tokens.
    So each step decodes a short window of ids twice, without and with the new tokens, and
    emits the difference once it no longer ends in U+FFFD (an incomplete UTF-8 sequence).
    """

    def __init__(self, tokenizer: Tokenizer, context_ids: Sequence[int] = (),
                 skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids = list(context_ids)[-8:]  # some context, so the first piece is spaced right
        self._prefix = 0  # start of the window decoded for reference
        self._read = len(self._ids)  # ids before this have been emitted

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        emitted = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        if len(text) <= len(emitted) or text.endswith("\ufffd"):
            return ""  # wait for the rest of a character
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(emitted):]

    def finish(self) -> str:
        """Whatever is held back at the end (a truly invalid tail decodes as U+FFFD)."""
        emitted = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return text[len(emitted):]


VOCABULARY_FILE = "vocabulary.json"


class Vocabulary:
    """Token strings <-> ids from a plain list (CTranslate2's vocabulary), for models without
    a tokenizer.json: the token-level API works, text encoding does not."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.index = {token: i for i, token in enumerate(tokens)}
        self.vocab_size = len(tokens)

    @classmethod
    def from_folder(cls, folder: Path) -> Vocabulary | None:
        import json

        path = Path(folder) / VOCABULARY_FILE
        if not path.is_file():
            return None
        return cls(json.loads(path.read_text(encoding="utf-8")))

    def token_to_id(self, token: str) -> int | None:
        return self.index.get(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tokens[token_id] if 0 <= token_id < len(self.tokens) else None

    def tokens_to_ids(self, tokens: Sequence[str]) -> list[int]:
        unknown = [token for token in tokens if token not in self.index]
        if unknown:
            raise ValueError(f"tokens not in the vocabulary: {unknown[:5]}; give token strings "
                             "of this model's vocabulary, or token ids")
        return [self.index[token] for token in tokens]

    def ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self.id_to_token(token_id) or "" for token_id in ids]
