"""The streaming detokenizer: never half a character; the joined stream equals the decode."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer as FastTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from kiln.generation.tokenizer import StreamingDetokenizer, Tokenizer

TEXTS = [
    "Hello, world! Streaming text should come out whole.",
    "東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다.",
    "Emoji: 👋🏽 👨‍👩‍👧‍👦 🇫🇷 and 🎉🎉 mixed with text, ok?",
    "Ünïcödé äccents, ß, and math ∑∫√ — plus 12345 digits.",
]


@pytest.fixture(scope="module")
def byte_level():
    """A tiny byte-level BPE: few merges, so CJK and emoji split into several byte tokens."""
    model = FastTokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|end|>"])
    model.train_from_iterator(TEXTS[:1] * 5, trainer=trainer)
    return Tokenizer(model)


def stream(tokenizer: Tokenizer, ids: list[int], context: list[int] = ()) -> list[str]:
    detokenizer = StreamingDetokenizer(tokenizer, context)
    pieces = [detokenizer.add(token) for token in ids]
    pieces.append(detokenizer.finish())
    return pieces


@pytest.mark.parametrize("text", TEXTS)
def test_joined_stream_equals_the_full_decode(byte_level, text):
    ids = byte_level.encode(text)
    if not text.isascii():  # multi-byte characters really are split across tokens
        assert len(ids) > len(text)
    pieces = stream(byte_level, ids)
    assert "".join(pieces) == byte_level.decode(ids) == text
    assert not any("\ufffd" in piece for piece in pieces)


@pytest.mark.parametrize("text", TEXTS[1:3])
def test_continuation_of_a_prompt(byte_level, text):
    prompt, continuation = byte_level.encode("Prompt: "), byte_level.encode(text)
    joined = "".join(stream(byte_level, continuation, context=prompt))
    full = byte_level.decode(prompt + continuation)
    assert full == "Prompt: " + text and joined == text


def test_pieces_come_as_soon_as_characters_complete(byte_level):
    ids = byte_level.encode("東")
    assert len(ids) == 3  # three UTF-8 bytes, three tokens
    detokenizer = StreamingDetokenizer(byte_level)
    assert [detokenizer.add(token) for token in ids] == ["", "", "東"]
    assert detokenizer.finish() == ""


def test_an_invalid_tail_is_flushed_at_the_end(byte_level):
    ids = byte_level.encode("a東")[:-1]  # cut inside the character
    pieces = stream(byte_level, ids)
    assert pieces[0] == "a" and "".join(pieces) == byte_level.decode(ids)


def test_special_tokens_are_skipped(byte_level):
    end = byte_level.token_to_id("<|end|>")
    ids = byte_level.encode("hi") + [end]
    assert "".join(stream(byte_level, ids)) == "hi"
