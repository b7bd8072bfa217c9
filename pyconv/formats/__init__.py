"""One adapter per checkpoint format, registered by name.

An adapter knows how to recognise its layout on disk (`detect`), read it into a
Catalog of canonical tensors (`read`), and plan its files for a target (`plan_output`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from pyconv.catalog import Catalog
from pyconv.errors import FormatError, LayoutError


@dataclass(frozen=True)
class FormatAdapter:
    name: str
    detect: Callable[[str], bool]
    read: Callable[[str], Catalog]
    plan_output: Callable | None  # (catalog, target) -> list[PlannedFile]; None: read-only format
    read_options: tuple[str, ...] = ()  # keyword options `read` takes (e.g. family)


_FORMATS: dict[str, FormatAdapter] = {}


def register_format(name: str, *, detect, read, plan_output=None, read_options=()) -> None:
    _FORMATS[name] = FormatAdapter(name, detect, read, plan_output, tuple(read_options))


def _load_builtin() -> None:
    # Imported lazily so `pyconv --help` does not pay for every adapter.
    from pyconv.formats import deepseek, mindspore, hf, torch_dist, megatron, legacy_megatron, nemo  # noqa: F401


# Adapters asked first, before the rest in registration order, because what they claim another
# adapter would claim too: torch_dist an iteration directory Megatron's tracker also names
# (only when it holds a distributed checkpoint), mindspore safetensors files (only by their
# MindFormers tensor names), megatron-legacy mp_rank_* directories the megatron adapter would
# also claim (only when the first rank's model has the legacy `language_model` tree), nemo
# directories holding mp_rank_* or a DCP directory too (only with NeMo's model_config.yaml or
# weights/ + context/).
DETECT_FIRST = ("nemo", "torch_dist", "mindspore", "megatron-legacy")


def format_names() -> list[str]:
    _load_builtin()
    return sorted(_FORMATS)


def get_format(name: str) -> FormatAdapter:
    _load_builtin()
    if name not in _FORMATS:
        raise LayoutError(f"unknown format '{name}' (known: {', '.join(sorted(_FORMATS))})")
    return _FORMATS[name]


def detect_format(path: str) -> FormatAdapter:
    _load_builtin()
    if not os.path.exists(path):
        raise FormatError(f"{path}: no such file or directory")
    first = {name: i for i, name in enumerate(DETECT_FIRST)}
    adapters = sorted(_FORMATS.values(), key=lambda a: first.get(a.name, len(first)))
    for adapter in adapters:
        if adapter.detect(path):
            return adapter
    raise FormatError(f"{path}: not a checkpoint pyconv recognises (looked for: {', '.join(sorted(_FORMATS))})")


def read_checkpoint(path: str, format: str | None = None, **options) -> Catalog:
    """options: reader options that apply (family=... for formats that do not name it)."""
    adapter = get_format(format) if format else detect_format(path)
    return adapter.read(path, **{k: v for k, v in options.items() if v is not None and k in adapter.read_options})
