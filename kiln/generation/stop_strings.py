"""Stop strings matched as text arrives, in time linear in the text (Aho-Corasick).

A stream of decoded text is fed piece by piece. After each piece the matcher knows where the
first stop string that showed starts, and how many characters at the end of the text could
still be the beginning of one (those must be held back from the client). Both come from one
automaton state per request, so a long stop string costs nothing per token beyond the new
characters themselves.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence


class StopMatcher:
    def __init__(self, stops: Sequence[str]) -> None:
        if not stops or not all(isinstance(stop, str) and stop for stop in stops):
            raise ValueError("stop strings must be non-empty strings")
        # Trie: per node its children, its depth, its failure link, and the longest stop
        # that ends at it (directly or through failure links; 0 if none).
        self._children: list[dict[str, int]] = [{}]
        self._depth = [0]
        self._ends = [0]
        for stop in stops:
            node = 0
            for char in stop:
                nxt = self._children[node].get(char)
                if nxt is None:
                    nxt = len(self._children)
                    self._children[node][char] = nxt
                    self._children.append({})
                    self._depth.append(self._depth[node] + 1)
                    self._ends.append(0)
                node = nxt
            self._ends[node] = max(self._ends[node], len(stop))
        self._fail = [0] * len(self._children)
        self._link_failures()
        self._state = 0
        self._fed = 0  # characters fed so far

    def _link_failures(self) -> None:
        queue = deque(self._children[0].values())
        while queue:
            node = queue.popleft()
            for char, child in self._children[node].items():
                fallback = self._fail[node]
                while fallback and char not in self._children[fallback]:
                    fallback = self._fail[fallback]
                target = self._children[fallback].get(char, 0)
                self._fail[child] = target if target != child else 0
                self._ends[child] = max(self._ends[child], self._ends[self._fail[child]])
                queue.append(child)

    def feed(self, piece: str) -> int | None:
        """Add text; the start (index in all the text fed) of the earliest-starting stop
        string that completed within this piece, or None."""
        children, fail, ends = self._children, self._fail, self._ends
        state, first = self._state, None
        for offset, char in enumerate(piece):
            while state and char not in children[state]:
                state = fail[state]
            state = children[state].get(char, 0)
            if ends[state]:
                start = self._fed + offset + 1 - ends[state]
                first = start if first is None else min(first, start)
        self._state = state
        self._fed += len(piece)
        return first

    @property
    def held(self) -> int:
        """Characters at the end of the text that could still begin a stop string."""
        return self._depth[self._state]
