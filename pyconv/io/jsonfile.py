"""Small JSON files of a checkpoint (config.json, index files, metadata.json), read as untrusted."""

from __future__ import annotations

import json

from pyconv.errors import FormatError

MAX_JSON_BYTES = 64 << 20  # an index of a very large model is a few MB
# A model config is KBs (one with a 20k-label id2label map, under 1 MB); parsed JSON takes ~25x
# its size in memory, so a 50 MB config.json would cost over a GB to read.
MAX_CONFIG_BYTES = 4 << 20


def load_json(path: str, what: str, max_bytes: int = MAX_JSON_BYTES):
    """The parsed file; FormatError naming the file if it cannot be read, is larger than
    max_bytes, or is not JSON."""
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise FormatError(f"{path}: cannot read {what}: {e.strerror}") from None
    if len(data) > max_bytes:
        raise FormatError(f"{path}: {what} is larger than {max_bytes} bytes")
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise FormatError(f"{path}: {what} is not valid JSON: {e}") from None


def load_config(path: str) -> dict:
    """A Hugging Face config.json: a JSON object, or FormatError naming the file."""
    config = load_json(path, "config", MAX_CONFIG_BYTES)
    if not isinstance(config, dict):
        raise FormatError(f"{path}: config is not a JSON object")
    return config


def config_architecture(config: dict) -> str | None:
    """The first of `architectures`, else `model_type`: what picks the family table."""
    archs = config.get("architectures")
    return archs[0] if isinstance(archs, list) and archs else config.get("model_type")


MAX_YAML_BYTES = 16 << 20


def parse_yaml(data: bytes, where: str, without_pyyaml: str = ""):
    """NeMo's model.yaml / model_config.yaml, parsed safely (no Python tags); FormatError naming
    `where` if it is not YAML or PyYAML is missing (`without_pyyaml`: what to do instead)."""
    try:
        import yaml
    except ImportError:
        raise FormatError(f"{where}: reading it needs PyYAML (pip install pyyaml)"
                          + (f", or {without_pyyaml}" if without_pyyaml else "")) from None
    try:
        return yaml.safe_load(data)
    except (yaml.YAMLError, RecursionError) as e:
        raise FormatError(f"{where}: not valid YAML: {str(e)[:200]}") from None


def load_yaml(path: str, without_pyyaml: str = ""):
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_YAML_BYTES)
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {e.strerror}") from None
    return parse_yaml(data, path, without_pyyaml)
