"""SmolLM3: the Llama table with NoPE layers. transformers' `no_rope_layers` (1: the layer applies
RoPE, 0: it does not; every `no_rope_layer_interval`-th layer by default) is Megatron-Core's
`no_rope_freq` as a per-layer list (1: the layer skips RoPE; TransformerConfig, attention.py
Attention.forward, 0.16.1). transformers 5.24's modeling_smollm3.py."""

from __future__ import annotations

from pyconv.errors import LayoutError
from pyconv.families import Family, ModelDims, register_family
from pyconv.families.llama import LLAMA_MAPPINGS, llama_dims, llama_hf_config, llama_megatron_args


def rope_layers(config: dict, layers: int) -> list[int]:
    """transformers' no_rope_layers: given, or one NoPE layer every no_rope_layer_interval."""
    given = config.get("no_rope_layers")
    if given is None:
        interval = int(config.get("no_rope_layer_interval", 4))
        given = [int((i + 1) % interval != 0) for i in range(layers)]
    if not isinstance(given, list) or len(given) != layers or any(v not in (0, 1) for v in given):
        raise LayoutError(f"config.json: no_rope_layers must be {layers} zeros and ones, got {given!r}")
    return [int(v) for v in given]


def smollm3_megatron_args(config: dict, dims: ModelDims) -> dict:
    return {**llama_megatron_args(config, dims),
            "no_rope_freq": [1 - v for v in rope_layers(config, dims.num_layers)]}


def smollm3_hf_config(args: dict) -> dict:
    config = llama_hf_config(args, "SmolLM3ForCausalLM", "smollm3")
    skip = args.get("no_rope_freq")
    if isinstance(skip, int):  # Megatron-LM's shorthand: every skip-th layer has no RoPE
        skip = ([0] * (skip - 1) + [1]) * (config["num_hidden_layers"] // skip)
    config["no_rope_layers"] = [1 - int(v) for v in skip or [0] * config["num_hidden_layers"]]
    return config


SMOLLM3 = register_family(Family(
    name="smollm3",
    architectures=("SmolLM3ForCausalLM",),
    mappings=LLAMA_MAPPINGS,
    dims_from_hf=llama_dims,
    megatron_args_from_hf=smollm3_megatron_args,
    hf_config_from_megatron=smollm3_hf_config,
    megatron_features=frozenset({"swiglu", "rmsnorm", "pos_rope", "no_rope"}),
    megatron_optional=frozenset({"linear_bias"}),
))
