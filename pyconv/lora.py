"""LoRA adapters as Hugging Face PEFT saves them (adapter_config.json + adapter_model.safetensors
or .bin), merged into a source's canonical tensors while converting: each targeted weight gains
a LowRankDelta (W += scale * B @ A, computed by the core as it copies the weight), so every
target format and parallel layout merges the same way, the deltas cut with the weight.

Followed: PEFT 0.21.2, peft/tuners/lora/layer.py (Linear.get_delta_weight: transpose(B @ A,
fan_in_fan_out) * scaling; Embedding: (B @ A)^T * scaling; scaling lora_alpha / r, or
lora_alpha / sqrt(r) with use_rslora) and peft/utils/other.py get_pattern_key (rank_pattern and
alpha_pattern keys match a module name as `(.*\\.)?(key)$`). Saved names: base_model.model.<module>
+ .lora_A.weight [r, in] / .lora_B.weight [out, r], .lora_embedding_A [r, vocab] /
.lora_embedding_B [dim, r]; modules_to_save and resized embeddings as whole weights."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, replace

from pyconv.catalog import CanonicalTensor, Catalog, LowRankDelta, SourceBlock, StoredTensor, view2d
from pyconv.errors import FormatError, LayoutError
from pyconv.io.jsonfile import load_json

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
FACTOR_DTYPES = ("F32", "BF16", "F16")
MAX_RANK = 16384  # the core's bound (csrc/executor.h kMaxLowRank): an fp32 tile of A, rank x 2048, per thread

# adapter_config.json fields that change what merging means; pyconv refuses them by name when set.
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora) adapters are not merged yet",
    "lora_bias": "LoRA biases (lora_bias) are not merged yet",
    "use_qalora": "QA-LoRA (use_qalora) adapters are not merged",
    "target_parameters": "adapters on parameters (target_parameters, e.g. fused MoE experts) are not merged yet",
    "trainable_token_indices": "trainable tokens (trainable_token_indices) are not merged yet",
    "layer_replication": "layer replication (layer_replication) changes the model's layers; not merged",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) applies only after its invocation "
                               "tokens; merging would change the model",
}
_A, _B = ".lora_A.weight", ".lora_B.weight"
_EMBED_A, _EMBED_B = ".lora_embedding_A", ".lora_embedding_B"


@dataclass(frozen=True)
class Adapter:
    path: str
    deltas: dict[str, LowRankDelta]       # canonical weight name -> its delta
    replaced: dict[str, StoredTensor]     # canonical name -> the adapter's whole tensor (modules_to_save)
    config: dict                          # adapter_config.json as read


def _pattern_value(patterns: dict, module: str, default, what: str, where: str):
    for key, value in patterns.items():  # PEFT's get_pattern_key: the first key that matches, in order
        try:
            found = re.match(rf"(.*\.)?({key})$", module)
        except re.error as e:
            raise FormatError(f"{where}: {what} key {key!r} is not a regular expression: {e}") from None
        if found:
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise FormatError(f"{where}: {what}[{key!r}] must be a positive number, got {value!r}")
            return value
    return default


def _weights(root: str) -> dict[str, StoredTensor]:
    for name in WEIGHT_FILES:
        path = os.path.join(root, name)
        if os.path.isfile(path):
            if name.endswith(".safetensors"):
                from pyconv.io.safetensors import read_safetensors

                return read_safetensors(path).tensors
            from pyconv.io.torchzip import read_state_dict

            return read_state_dict(path)
    raise FormatError(f"{root}: no {' or '.join(WEIGHT_FILES)} (a PEFT adapter directory holds one beside "
                      f"{CONFIG_FILE})")


def read_adapter(path: str) -> Adapter:
    """A PEFT LoRA adapter directory; FormatError naming the file and the problem otherwise."""
    from pyconv.io.tree import check_regular_tree

    root = os.path.abspath(path)
    config_path = os.path.join(root, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise FormatError(f"{root}: no {CONFIG_FILE}: not a PEFT adapter directory")
    check_regular_tree(root)  # a FIFO named like the config or the weights would block the read
    config = load_json(config_path, "adapter config")
    if not isinstance(config, dict):
        raise FormatError(f"{config_path}: not a JSON object")
    if config.get("peft_type") != "LORA":
        raise FormatError(f"{config_path}: peft_type {config.get('peft_type')!r}: pyconv merges LORA adapters only")
    for key, why in _UNSUPPORTED.items():
        if config.get(key) not in (None, False, [], {}, ""):
            raise LayoutError(f"{config_path}: {why}")
    r, alpha = config.get("r"), config.get("lora_alpha")
    for name, value in (("r", r), ("lora_alpha", alpha)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise FormatError(f"{config_path}: {name} must be a positive number, got {value!r}")
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    if not isinstance(rank_pattern, dict) or not isinstance(alpha_pattern, dict):
        raise FormatError(f"{config_path}: rank_pattern and alpha_pattern must be objects")
    rslora, fan_in_fan_out = bool(config.get("use_rslora")), bool(config.get("fan_in_fan_out"))

    tensors = _weights(root)
    factors: dict[str, dict[str, StoredTensor]] = {}
    replaced: dict[str, StoredTensor] = {}
    for key, stored in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise FormatError(f"{root}: tensor '{key}' does not start with '{PEFT_PREFIX}' (not a PEFT LoRA adapter)")
        name = key[len(PEFT_PREFIX):]
        for suffix in (_A, _B, _EMBED_A, _EMBED_B):
            if name.endswith(suffix):
                factors.setdefault(name[:-len(suffix)], {})[suffix] = stored
                break
        else:
            if ".lora_" in name or name.endswith(".lora_magnitude_vector"):
                raise LayoutError(f"{root}: tensor '{key}' is an adapter weight pyconv does not merge")
            # modules_to_save, or an embedding saved whole (resized): the weight as the adapter holds it
            replaced[name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")] = stored

    deltas: dict[str, LowRankDelta] = {}
    for module, found in sorted(factors.items()):
        embedding = _EMBED_A in found or _EMBED_B in found
        a_key, b_key = (_EMBED_A, _EMBED_B) if embedding else (_A, _B)
        if set(found) != {a_key, b_key}:
            raise FormatError(f"{root}: module {module} has {sorted(found)}, not both {a_key} and {b_key}")
        a, b = found[a_key], found[b_key]
        for which, t in (("A", a), ("B", b)):
            if t.dtype not in FACTOR_DTYPES or len(t.shape) != 2:
                raise FormatError(f"{root}: {PEFT_PREFIX}{module}{a_key if which == 'A' else b_key} is {t.dtype} "
                                  f"{list(t.shape)}; LoRA factors are 2-D {', '.join(FACTOR_DTYPES)}")
        rank = a.shape[0]
        if not 1 <= rank <= MAX_RANK:
            raise FormatError(f"{root}: module {module} has rank {rank}; pyconv merges ranks 1 to {MAX_RANK}")
        if b.shape[1] != rank:
            raise FormatError(f"{root}: module {module}: A is {list(a.shape)} but B is {list(b.shape)} (ranks differ)")
        want_rank = _pattern_value(rank_pattern, module, r, "rank_pattern", config_path)
        if want_rank != rank:
            raise FormatError(f"{root}: module {module} has rank {rank}, its config says {want_rank}")
        module_alpha = _pattern_value(alpha_pattern, module, alpha, "alpha_pattern", config_path)
        scale = module_alpha / math.sqrt(rank) if rslora else module_alpha / rank
        # Linear: delta = B @ A, or its transpose with fan_in_fan_out (Conv1D stores [in, out]);
        # Embedding: (B @ A)^T = A^T @ B^T over the [vocab, dim] weight.
        transposed = embedding or fan_in_fan_out
        deltas[module + ".weight"] = (LowRankDelta(a, b, True, True, scale, root) if transposed
                                      else LowRankDelta(b, a, False, False, scale, root))
    return Adapter(root, deltas, replaced, config)


def merge_adapters(catalog: Catalog, paths: list[str]) -> Catalog:
    """The catalog with each adapter merged, in order: deltas on the weights they target, whole
    tensors replacing those the adapter saved. Refuses (LayoutError) a target the source lacks or
    whose shape differs."""
    tensors = dict(catalog.tensors)
    notes = []
    for path in paths:
        adapter = read_adapter(path)
        changed = []
        for name, stored in adapter.replaced.items():
            base = tensors.get(name)
            if base is None:
                raise LayoutError(f"{adapter.path}: it saves '{name}', which {catalog.path} does not have")
            if tuple(stored.shape) != tuple(base.shape):
                raise LayoutError(f"{adapter.path}: '{name}' is {list(stored.shape)} in the adapter, "
                                  f"{list(base.shape)} in {catalog.path}")
            rows, cols = view2d(stored.shape)
            # Loaded into the model's parameter (copy_ keeps the model's dtype), earlier deltas gone.
            tensors[name] = CanonicalTensor(name, base.dtype, base.shape, (SourceBlock(stored, 0, 0, rows, cols, 0, 0),))
            changed.append(name)
        for name, delta in adapter.deltas.items():
            base = tensors.get(name)
            if base is None:
                raise LayoutError(f"{adapter.path}: it adapts '{name}', which {catalog.path} does not have")
            if len(base.shape) != 2:
                raise LayoutError(f"{adapter.path}: '{name}' is {list(base.shape)} in {catalog.path}, not a matrix")
            if base.dtype not in FACTOR_DTYPES:
                raise LayoutError(f"{adapter.path}: '{name}' is {base.dtype} in {catalog.path}; LoRA merges into "
                                  f"{', '.join(FACTOR_DTYPES)} weights (dequantize first)")
            tensors[name] = replace(base, deltas=base.deltas + (delta,))
            changed.append(name)
        changed = sorted(set(changed))
        notes.append(f"LoRA adapter {adapter.path}: merged into {len(changed)} tensors ({', '.join(changed)})")
    return replace(catalog, tensors=tensors, notes=catalog.notes + tuple(notes))
