"""The per-token work of the engine done incrementally: stop strings matched as text arrives
(Aho-Corasick) and prompt-lookup proposals from an n-gram index, each checked against the
plain whole-text computation it replaces."""

from __future__ import annotations

import random

import pytest

from kiln.generation.proposers import NgramIndex
from kiln.generation.speculation import lookup_proposals
from kiln.generation.stop_strings import StopMatcher
from kiln.generation.text_stream import TextStream


class Pieces:
    """A detokenizer stand-in: each 'token' is an index into a list of text pieces."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces

    def add(self, token: int) -> str:
        return self.pieces[token]

    def finish(self) -> str:
        return ""


def reference_release(pieces: list[str], stops: list[str]) -> tuple[list[str], bool]:
    """The whole-text rule: after each piece, give out the text up to the first stop string
    (by start) or up to the longest end that begins a stop string."""
    text, released, given = "", 0, []
    for piece in pieces:
        text += piece
        found = [i for i in (text.find(stop) for stop in stops) if i >= 0]
        if found:
            cut = min(found)
            given.append(text[released:cut] if cut > released else "")
            return given, True
        held = 0
        for size in range(min(len(text), max(map(len, stops)) - 1), 0, -1):
            if any(stop.startswith(text[-size:]) for stop in stops):
                held = size
                break
        end = len(text) - held
        given.append(text[released:end] if end > released else "")
        released = max(released, end)
    given.append(text[released:])
    return given, False


def stream_release(pieces: list[str], stops: list[str]) -> tuple[list[str], bool]:
    stream = TextStream.__new__(TextStream)
    TextStream.__init__(stream, _NoTokenizer(), [], stops)
    stream.detokenizer = Pieces(pieces)
    given = []
    for index in range(len(pieces)):
        given.append(stream.add(index))
        if stream.stopped:
            return given, True
    given.append(stream.finish())
    return given, False


class _NoTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return ""


@pytest.mark.parametrize("seed", range(200))
def test_text_stream_gives_out_what_the_whole_text_rule_gives(seed):
    picker = random.Random(seed)
    alphabet = "ab c\n"
    stops = ["".join(picker.choice(alphabet) for _ in range(picker.randint(1, 6)))
             for _ in range(picker.randint(1, 3))]
    pieces = ["".join(picker.choice(alphabet) for _ in range(picker.randint(0, 4)))
              for _ in range(picker.randint(1, 30))]
    assert stream_release(pieces, stops) == reference_release(pieces, stops)


def test_stop_matcher_finds_the_earliest_start_and_what_to_hold_back():
    matcher = StopMatcher(["abcd", "bc", "xyz"])
    assert matcher.feed("zab") is None and matcher.held == 2  # "ab" may begin "abcd"
    assert matcher.feed("cd") == 1  # "abcd" (from 1) completes after "bc" (from 2): earliest
    fresh = StopMatcher(["\n\n", "###"])
    assert fresh.feed("one\n") is None and fresh.held == 1
    assert fresh.feed("#") is None and fresh.held == 1
    assert fresh.feed("##") == 4
    with pytest.raises(ValueError, match="non-empty"):
        StopMatcher([""])


def test_a_long_stop_string_costs_its_characters_once():
    """Feeding text costs one automaton walk per character however long the stop strings are
    (the whole-text rule compared every end of the text with every stop string)."""
    stop = "x" * 5000 + "!"
    matcher = StopMatcher([stop])
    for _ in range(4000):
        assert matcher.feed("x") is None
    assert matcher.held == 4000
    assert matcher.feed("x" * 1000 + "!") == 0


@pytest.mark.parametrize("seed", range(50))
def test_ngram_index_proposes_what_a_full_rescan_proposes(seed):
    picker = random.Random(seed)
    vocab = picker.randint(2, 6)
    history = [picker.randrange(vocab) for _ in range(picker.randint(1, 8))]
    index = NgramIndex(history)
    for _ in range(60):
        count = picker.randint(0, 6)
        assert index.propose(count) == lookup_proposals(history, count)
        new = [picker.randrange(vocab) for _ in range(picker.randint(1, 3))]
        history += new
        index.extend(new)
