"""Tensor-name patterns of the family tables ('*' a layer index, '#' an expert index), looked up
by a name's skeleton instead of tried one by one: with 150k tensors and ~30 patterns a family,
matching every name against every pattern was most of planning."""

from __future__ import annotations

import re
from typing import Generic, Iterator, TypeVar

Payload = TypeVar("Payload")

_DIGITS = re.compile(r"\d+")


def compile_pattern(pattern: str) -> re.Pattern:
    """'*' (layer) and '#' (expert) become named groups."""
    regex = re.escape(pattern).replace(r"\*", r"(?P<layer>\d+)").replace(r"\#", r"(?P<expert>\d+)")
    return re.compile("^" + regex + "$")


def skeleton(name: str) -> str:
    """The name with every run of digits as one NUL: 'layers.12.mlp.experts.3.w' -> 'layers.\\0.mlp.experts.\\0.w'."""
    return _DIGITS.sub("\0", name)


class PatternIndex(Generic[Payload]):
    """Patterns in table order, each with its payload. A name can match a pattern only if their
    skeletons (a wildcard counting as a run of digits) are equal, when no wildcard touches a digit
    or another wildcard in the pattern: then each wildcard's digits are one whole run of the name.
    Other patterns (none in today's tables) are tried for every name."""

    def __init__(self, entries: list[tuple[str, Payload]]):
        self._by_skeleton: dict[str, list[tuple[int, re.Pattern, Payload]]] = {}
        self._everywhere: list[tuple[int, re.Pattern, Payload]] = []
        for order, (pattern, payload) in enumerate(entries):
            entry = (order, compile_pattern(pattern), payload)
            key = skeleton(pattern.replace("*", "\0").replace("#", "\0"))
            if "\0\0" in key:  # a wildcard beside a digit or a wildcard
                self._everywhere.append(entry)
            else:
                self._by_skeleton.setdefault(key, []).append(entry)

    def matches(self, name: str) -> Iterator[tuple[re.Match, Payload]]:
        """(match, payload) of every pattern the name matches, in table order."""
        candidates = self._by_skeleton.get(skeleton(name), ())
        if self._everywhere:
            candidates = sorted([*candidates, *self._everywhere], key=lambda e: e[0])
        for _, regex, payload in candidates:
            m = regex.match(name)
            if m:
                yield m, payload

    def first(self, name: str) -> tuple[re.Match, Payload] | None:
        return next(self.matches(name), None)
