"""One adapter per checkpoint format, listed here by name; each imported only when used.

An adapter is a module with `detect(path) -> bool`, `read(path, **READ_OPTIONS) -> Catalog` and,
if the format can be written, `plan_output(catalog, target) -> list[PlannedFile]` with `Options`,
the frozen dataclass of its target options (target.options). Adapters
share code through pyconv.mcore, layout, families and io, never by importing one another
(tests/test_architecture.py walks the imports).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable

from pyconv.catalog import Catalog
from pyconv.errors import FormatError, LayoutError
from pyconv.io.parse_once import parse_once
from pyconv.io.tree import check_regular_tree

# (format name, adapter module, writable), in detection order. Asked first are the adapters
# whose layouts another adapter would claim too: nemo directories holding mp_rank_* or a DCP
# directory (only with NeMo's model_config.yaml or weights/ + context/), torch_dist an iteration
# directory Megatron's tracker also names (only when it holds a distributed checkpoint),
# mindspore safetensors files (only by their MindFormers tensor names), megatron-legacy
# mp_rank_* directories the megatron adapter would also claim (only when the first rank's model
# has the legacy `language_model` tree).
FORMATS = (
    ("nemo", "nemo", True),
    ("torch_dist", "torch_dist", True),
    ("mindspore", "mindspore", True),
    ("megatron-legacy", "legacy_megatron", True),
    ("deepseek", "deepseek", True),
    ("hf", "hf", True),
    ("megatron", "megatron", True),
)
_MODULES = {name: module for name, module, _ in FORMATS}


@dataclass(frozen=True)
class FormatAdapter:
    name: str
    detect: Callable[[str], bool]
    read: Callable[..., Catalog]
    plan_output: Callable | None  # (catalog, target) -> list[PlannedFile]; None: read-only format
    read_options: tuple[str, ...] = ()  # keyword options `read` takes (e.g. family)
    options: type | None = None  # the target options plan_output takes (a frozen dataclass)


_LOADED: dict[str, FormatAdapter] = {}


def format_names() -> list[str]:
    return sorted(_MODULES)


def writable_format_names() -> list[str]:
    return sorted(name for name, _, writable in FORMATS if writable)


def get_format(name: str) -> FormatAdapter:
    if name not in _MODULES:
        raise LayoutError(f"unknown format '{name}' (known: {', '.join(format_names())})")
    if name not in _LOADED:
        module = importlib.import_module(f"pyconv.formats.{_MODULES[name]}")
        _LOADED[name] = FormatAdapter(name, module.detect, module.read, getattr(module, "plan_output", None),
                                      tuple(getattr(module, "READ_OPTIONS", ())), getattr(module, "Options", None))
    return _LOADED[name]


def detect_format(path: str) -> FormatAdapter:
    if not os.path.exists(path):
        raise FormatError(f"{path}: no such file or directory")
    for name, _, _ in FORMATS:
        adapter = get_format(name)
        if adapter.detect(path):
            return adapter
    from pyconv.lora import CONFIG_FILE as ADAPTER_CONFIG  # only on this error path

    if os.path.isfile(os.path.join(path, ADAPTER_CONFIG)):
        raise FormatError(f"{path}: a PEFT adapter, not a model: merge it into its base model with reshard BASE DST "
                          f"--merge-lora {path}, or carry it to Megatron's layout with pyconv lora")
    raise FormatError(f"{path}: not a checkpoint pyconv recognises (looked for: {', '.join(format_names())})")


def read_checkpoint(path: str, format: str | None = None, **options) -> Catalog:
    """options: reader options that apply (family=... for formats that do not name it)."""
    if not os.path.exists(path):
        raise FormatError(f"{path}: no such file or directory")
    check_regular_tree(path)
    with parse_once():  # detection and reading parse each file's header once between them
        adapter = get_format(format) if format else detect_format(path)
        return adapter.read(path, **{k: v for k, v in options.items() if v is not None and k in adapter.read_options})
