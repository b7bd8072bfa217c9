"""Config translation shared by the families: HF config.json <-> Megatron args."""

from __future__ import annotations

import json
import math

from pyconv.errors import FormatError



def positive_number(value, what: str, where: str = "config.json", zero: bool = False) -> float:
    """A finite number > 0 (>= 0 with zero) - an int or float in the JSON, not a bool or a
    string - as a float."""
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or value < 0 or (value == 0 and not zero)):
        raise FormatError(f"{where}: {what} must be a {'non-negative' if zero else 'positive'} number, "
                          f"got {repr(value)[:60]}")
    return float(value)


def rope_theta(config: dict, default: float = 10000.0) -> float:
    """transformers 5 keeps it in rope_parameters; older configs at the top level."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        return positive_number(params["rope_theta"], "rope_parameters.rope_theta")
    return positive_number(config.get("rope_theta", default), "rope_theta")


def rope_parameters(config: dict) -> dict:
    """The rope scaling of an HF config: transformers 5's rope_parameters, or the older
    rope_scaling (its `type` spelled `rope_type` since 4.45); {"rope_type": "default"} when plain."""
    params = config.get("rope_parameters")
    if not isinstance(params, dict) or params.get("rope_type", params.get("type")) in (None, "default"):
        params = config.get("rope_scaling") if isinstance(config.get("rope_scaling"), dict) else params
    params = dict(params) if isinstance(params, dict) else {}
    params["rope_type"] = params.get("rope_type", params.pop("type", None)) or "default"
    return params


def require(config: dict, key: str, where: str = "config.json"):
    if key not in config or config[key] is None:
        raise FormatError(f"{where}: missing '{key}'")
    return config[key]


def original_hf_config(args: dict) -> dict:
    """The HF config pyconv stored beside the args when it wrote the checkpoint, if any."""
    text = args.get("pyconv_hf_config")
    if not isinstance(text, str):
        return {}
    try:
        config = json.loads(text)
    except ValueError:
        return {}
    return config if isinstance(config, dict) else {}


def arg(args: dict, key: str, where: str):
    if key not in args or args[key] is None:
        raise FormatError(f"{where}: Megatron args have no '{key}'")
    return args[key]
