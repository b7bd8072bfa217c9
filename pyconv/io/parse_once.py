"""Each file's header is parsed at most once per read of a checkpoint: detection peeks at the
files that reading then parses again (a MindFormers or HF safetensors header, a Megatron rank-0
pickle). Inside `parse_once()` a parse is remembered by its key; outside, nothing is cached, so a
file that changes between two runs is never served from a stale parse."""

from __future__ import annotations

from contextlib import contextmanager

_SCOPES: list[dict] = []


@contextmanager
def parse_once():
    _SCOPES.append({})
    try:
        yield
    finally:
        _SCOPES.pop()


def parsed(key: tuple, parse):
    """parse(), or the result of the same key's parse earlier in the current scope (failures are
    not remembered: they raise again)."""
    if not _SCOPES:
        return parse()
    scope = _SCOPES[-1]
    if key not in scope:
        scope[key] = parse()
    return scope[key]
