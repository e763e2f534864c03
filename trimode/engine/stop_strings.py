"""Stop strings searched incrementally: an Aho-Corasick automaton over a request's stop strings
(Aho & Corasick, 1975). Its state after the text so far is all a search needs, so each step feeds
only the new characters: O(new characters) amortised, whatever the number and length of the stop
strings (searching every stop string again each step was O(stops x length) per row and step). The
state's depth is also the longest tail of the text that could still grow into a stop string: what
streaming holds back.

pyahocorasick (the PyPI library) finds matches in a whole string but keeps no state between calls and
reports no depth, so a stop string straddling two steps would need the text searched again."""

from __future__ import annotations

import functools
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class StopMatcher:
    """The automaton of a tuple of stop strings; node 0 is the empty prefix. Immutable: a request
    keeps only its state (a node)."""

    goto: dict[tuple[int, str], int]  # trie edges: (node, next character) -> child
    fail: list[int]  # the node of the longest proper suffix of a node's prefix that is also a prefix
    depth: list[int]  # the length of a node's prefix
    longest: list[int]  # the longest stop string that ends a node's prefix (0: none)
    max_len: int

    def step(self, state: int, ch: str) -> int:
        """The state after one more character."""
        while state and (state, ch) not in self.goto:
            state = self.fail[state]
        return self.goto.get((state, ch), 0)

    def scan(self, state: int, text: str, start: int) -> tuple[int, tuple[int, int] | None]:
        """Feed text[start:] from `state` (the state after text[:start]): the new state, and the
        earliest-starting stop string that ends in the new characters as (start, end) in `text`
        (of those starting at the same place, the shortest), or None."""
        best: tuple[int, int] | None = None
        for end in range(start + 1, len(text) + 1):
            if best is not None and end - self.max_len >= best[0]:
                break  # a later match starts too late to come first
            state = self.step(state, text[end - 1])
            n = self.longest[state]
            if n and (best is None or end - n < best[0]):
                best = (end - n, end)
        return state, best


@functools.lru_cache(maxsize=8)
def stop_matcher(stops: tuple[str, ...]) -> StopMatcher:
    """The automaton for `stops` (cached: the n samples of a request, and clients repeating a stop
    list, share one)."""
    goto: dict[tuple[int, str], int] = {}
    children: list[list[tuple[str, int]]] = [[]]
    depth, longest = [0], [0]
    for s in stops:
        node = 0
        for ch in s:
            child = goto.get((node, ch))
            if child is None:
                child = goto[(node, ch)] = len(depth)
                children[node].append((ch, child))
                children.append([])
                depth.append(depth[node] + 1)
                longest.append(0)
            node = child
        longest[node] = len(s)
    fail = [0] * len(depth)
    queue = deque(child for _, child in children[0])
    while queue:  # breadth first: a node's fail link is set before its children's need it
        node = queue.popleft()
        for ch, child in children[node]:
            f = fail[node]
            while f and (f, ch) not in goto:
                f = fail[f]
            fail[child] = goto.get((f, ch), 0)
            # A stop string ending at the fail node's prefix also ends this one's.
            longest[child] = longest[child] or longest[fail[child]]
            queue.append(child)
    return StopMatcher(goto, fail, depth, longest, max(map(len, stops)))
