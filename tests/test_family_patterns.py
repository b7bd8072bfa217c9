"""PatternIndex (families/patterns.py) finds exactly what trying every pattern in table order finds,
for every registered family's names; quick_init (plan.py) keeps the dataclass's contract."""

from __future__ import annotations

import dataclasses
import inspect
import itertools

import pytest

from pyconv.families import families_with
from pyconv.families.patterns import PatternIndex, compile_pattern
from pyconv.plan import BlockCopy, PlannedTensor


def _linear(patterns, name):
    return [payload for pattern, payload in patterns if compile_pattern(pattern).match(name)]


def _names(pattern: str):
    for layer, expert in itertools.product((0, 7, 12, 305), (0, 3, 10)):
        yield pattern.replace("*", str(layer)).replace("#", str(expert))


def test_every_family_pattern_matches_as_a_linear_scan_would():
    checked = 0
    for family in families_with(lambda f: True):
        mappings = family.mappings + family.mtp_before + family.mtp_after
        patterns = [(p, (id(m), i)) for m in mappings for i, p in enumerate(m.hf)]
        patterns += [(p, (id(m), "megatron")) for m in mappings for p in m.megatron_names()]
        index = PatternIndex(patterns)
        for pattern, _ in patterns:
            for name in _names(pattern):
                assert [p for _, p in index.matches(name)] == _linear(patterns, name), (family.name, name)
                checked += 1
            # near misses: a digit glued to an index, an extra component, a prefix
            for name in (pattern.replace("*", "1a"), pattern + ".x", "x." + pattern.replace("*", "1")):
                assert [p for _, p in index.matches(name)] == _linear(patterns, name)
    assert checked > 1000


def test_patterns_whose_wildcards_touch_digits_are_still_found_in_table_order():
    patterns = [("a.*1.w", "glued"), ("a.*.w", "plain"), ("a.#*.w", "two wildcards"), ("b.fc2.*", "literal digit")]
    index = PatternIndex(patterns)
    for name in ("a.51.w", "a.5.w", "a.123.w", "b.fc2.3", "b.fc2.x", "a..w"):
        assert [p for _, p in index.matches(name)] == _linear(patterns, name), name
    assert [p for _, p in index.matches("a.51.w")] == ["glued", "plain", "two wildcards"]


@pytest.mark.parametrize("cls", [BlockCopy, PlannedTensor])
def test_quick_init_keeps_the_dataclass_contract(cls):
    fields = dataclasses.fields(cls)
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    assert [p.name for p in params] == [f.name for f in fields]
    assert [p.default for p in params] == [f.default if f.default is not dataclasses.MISSING else inspect.Parameter.empty
                                          for f in fields]
    values = {f.name: (f.default if f.default is not dataclasses.MISSING else f"v{i}") for i, f in enumerate(fields)}
    obj = cls(**values)
    assert dataclasses.asdict(obj) == values and vars(obj) == values
    first = fields[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(obj, first, "other")
    assert dataclasses.replace(obj, **{first: "other"}) == cls(**{**values, first: "other"})
    assert hash(obj) == hash(cls(**values))
