"""NeMo 2 checkpoint directories, and NeMo 1 key names.

    DIR/weights/      a Megatron-Core distributed checkpoint (torch_dist: metadata.json,
                      .metadata, __R_N.distcp, common.pt) whose keys carry NeMo's `module.`
                      prefix: `module.decoder.layers.self_attention.linear_qkv.weight`
    DIR/context/      io.json     fiddle's JSON serialization of the TrainerContext; the model
                                  config is the object at path `<root>.model.config`: a
                                  fiddle Config of e.g. `nemo.collections.llm.gpt.model.llama.
                                  LlamaConfig` whose items are the arguments set explicitly
                                  (the others keep the class defaults)
                      model.yaml  the same model as YAML (`_target_` keys)
                      nemo_tokenizer/   the tokenizer artifact (HF tokenizer files)

NeMo 1 (an extracted .nemo archive: model_config.yaml with model_weights.ckpt, mp_rank_TT/ or
tp_rank_TT_pp_rank_PPP/ rank directories, or distributed model_weights/) is read here when its
keys are Megatron-Core's (`model.decoder...`), its weights distributed, or its model Llama-style;
GPT-2 and BERT in the pre-Megatron-Core names (and .nemo archives) are the megatron-legacy
adapter's.

Reading maps every key to its Megatron-Core name (`nemo_to_mcore_key`: NeMo 2's `module.`, NeMo
1's `model.` and `language_model.` dropped, the pre-Megatron-Core names of NeMo 1 models
renamed: dense_h_to_4h -> linear_fc1, dense_4h_to_h -> linear_fc2, query_key_value ->
linear_qkv, self_attention.dense -> linear_proj, post_attention_layernorm -> pre_mlp_layernorm,
lm_head -> output_layer, encoder -> decoder) and reads the weights with the torch_dist reader.
The model's dims come from a Hugging Face config.json where one lies beside the checkpoint (in
DIR or in the tokenizer artifact, where pyconv's writer puts it), else from io.json's config
(model.yaml when io.json is absent and PyYAML is installed), translated to Megatron-LM's args.

Writing produces weights/ as NeMo's HF importer does (no vocabulary padding: the divisor is the
largest power of two <= 128 that divides the vocabulary), context/io.json and model.yaml naming
NeMo's model and config classes with every field explicit, and context/nemo_tokenizer/ with the
tokenizer files and the HF config.json.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import json
import os
import re

from pyconv.catalog import Catalog
from pyconv.dtypes import FLOAT_DTYPES, TORCH_NAME, model_dtype
from pyconv.errors import FormatError, LayoutError
from pyconv.mcore.checkpoint import OPTIMIZER_KEY_PREFIX
from pyconv.mcore.options import DcpOptions
from pyconv.io.jsonfile import config_architecture, load_config, load_json, load_yaml
from pyconv.plan import PlannedFile, TargetSpec, plan_file_copy, plan_text_file

if TYPE_CHECKING:
    from pyconv.families import Family

WEIGHTS = "weights"
CONTEXT = "context"
IO_JSON = "io.json"
MODEL_YAML = "model.yaml"
TOKENIZER_DIR = "nemo_tokenizer"
CONFIG = "config.json"
NEMO2_PREFIX = "module."
NEMO1_CONFIG = "model_config.yaml"        # an extracted NeMo 1 .nemo archive
NEMO1_WEIGHTS_FILE = "model_weights.ckpt"
NEMO1_WEIGHTS_DIR = "model_weights"       # its distributed (torch_dist) weights
_MCORE_PREFIXES = ("model.decoder.", "model.embedding.", "model.output_layer.")
_NEMO1_RANK_DIR = re.compile(r"^(?:mp_rank_(\d{2})|tp_rank_(\d{2})_pp_rank_(\d{3}))$")
_MODEL_CONFIG_PATH = "<root>.model.config"

# ---- NeMo 1 / NeMo 2 key names -> Megatron-Core ----------------------------------------------------

# Pre-Megatron-Core (NeMo 1 "language_model") names -> Megatron-Core names, applied in order to
# the dotted components of a key with its prefix removed.
_LEGACY_RENAMES = (
    (re.compile(r"(^|\.)dense_h_to_4h\."), r"\1linear_fc1."),
    (re.compile(r"(^|\.)dense_4h_to_h\."), r"\1linear_fc2."),
    (re.compile(r"(^|\.)query_key_value\."), r"\1linear_qkv."),
    (re.compile(r"(^|\.)self_attention\.dense\."), r"\1self_attention.linear_proj."),
    (re.compile(r"(^|\.)post_attention_layernorm\."), r"\1pre_mlp_layernorm."),
    (re.compile(r"^lm_head\.(weight|bias)$"), r"output_layer.\1"),
    (re.compile(r"^lm_head\.layernorm\."), "lm_head.layer_norm."),  # BERT's masked-LM head
    (re.compile(r"^encoder\."), "decoder."),  # GPT: the legacy "encoder" stack is Megatron-Core's decoder
)

READ_OPTIONS = ("family",)  # read(path, family=...): the family of a checkpoint whose args do not tell it


Options = DcpOptions  # weights/ is a torch_dist checkpoint



def nemo_to_mcore_key(key: str, stack: str = "decoder") -> str:
    """'module.decoder.layers.mlp.linear_fc1.weight' -> 'decoder.layers.mlp.linear_fc1.weight';
    'model.language_model.encoder.layers.0.mlp.dense_h_to_4h.weight' ->
    'decoder.layers.0.mlp.linear_fc1.weight'. Megatron-Core names pass through unchanged, except
    that the layer stack is called `stack`: Megatron-Core's GPTModel calls it decoder, its
    BertModel encoder (NeMo 1's pre-Megatron-Core models encoder in both)."""
    for prefix in (NEMO2_PREFIX, "model."):
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    if key.startswith("language_model."):
        key = key[len("language_model."):]
    for pattern, replacement in _LEGACY_RENAMES:
        key = pattern.sub(replacement, key)
    if stack != "decoder" and key.startswith("decoder."):
        key = stack + key[len("decoder"):]
    return key


def layer_stack(family: Family) -> str:
    """'decoder' or 'encoder': what the family's Megatron-Core names call the layer stack."""
    from pyconv.families import LAYER

    name = next(m.megatron_name("te") for m in family.mappings if m.where == LAYER)
    return name.split(".layers.", 1)[0]


# ---- where the checkpoint is -----------------------------------------------------------------------

def _is_nemo2(path: str) -> bool:
    if not (os.path.isdir(path) and os.path.isdir(os.path.join(path, CONTEXT))):
        return False
    from pyconv.mcore.checkpoint import is_dcp_dir

    return is_dcp_dir(os.path.join(path, WEIGHTS))


def _is_nemo1(path: str) -> bool:
    """An extracted NeMo 1 checkpoint this adapter reads. The megatron-legacy adapter reads the
    GPT-2 and BERT ones in pre-Megatron-Core names (and .nemo archives); this one the rest:
    distributed weights, Megatron-Core names (`model.decoder...`), and Llama-style models
    (SwiGLU, RMSNorm, rotary positions, grouped-query attention) in the old names."""
    if not (os.path.isdir(path) and os.path.isfile(os.path.join(path, NEMO1_CONFIG))):
        return False
    if os.path.isdir(os.path.join(path, NEMO1_WEIGHTS_DIR)):
        return True
    try:
        files = _nemo1_rank_files(path, complete=False)  # reading reports a missing rank
        if not files:
            return False
        from pyconv.io.torchzip import read_torch_checkpoint

        state = _nemo1_state(read_torch_checkpoint(files[min(files)]).obj, files[min(files)])
    except FormatError:
        return False  # not ours to judge: megatron-legacy (or nobody) reports what is wrong
    if any(str(k).startswith(_MCORE_PREFIXES) for k in state):
        return True
    try:
        cfg = load_yaml(os.path.join(path, NEMO1_CONFIG))
    except FormatError:  # unreadable config: megatron-legacy reports it
        return False
    if not isinstance(cfg, dict):
        return False
    heads = cfg.get("num_attention_heads")
    return (str(cfg.get("activation", "")).endswith("swiglu") or cfg.get("normalization") == "rmsnorm"
            or cfg.get("position_embedding_type") == "rope" or cfg.get("num_query_groups") not in (None, heads))


def detect(path: str) -> bool:
    return _is_nemo2(path) or _is_nemo1(path)


# ---- the model config in context/ -------------------------------------------------------------------

def _attr_name(label, where: str) -> str:
    m = re.fullmatch(r"Attr\(name='([A-Za-z_][A-Za-z0-9_]*)'\)", label) if isinstance(label, str) else None
    if m is None:
        raise FormatError(f"{where}: item label {str(label)[:80]!r} is not an Attr(name='...')")
    return m.group(1)


class _FiddleGraph:
    """Reads values out of fiddle's JSON serialization (objects by key, refs, pyrefs, leaves)
    without importing anything it names: a pyref becomes the string 'module.name'."""

    def __init__(self, data, where: str):
        if not isinstance(data, dict) or not isinstance(data.get("objects"), dict):
            raise FormatError(f"{where}: not a fiddle serialization (no 'objects')")
        self.objects, self.where = data["objects"], where

    def find(self, path: str):
        for key, obj in self.objects.items():
            if isinstance(obj, dict) and path in (obj.get("paths") or ()):
                return obj
        return None

    def value(self, node, depth: int = 0):
        if depth > 32:
            raise FormatError(f"{self.where}: values nested too deeply")
        if isinstance(node, list):
            return [self.value(v, depth + 1) for v in node]
        if not isinstance(node, dict):
            return node
        kind = node.get("type")
        if kind == "leaf":
            return node.get("value")
        if kind == "pyref":
            return f"{node.get('module')}.{node.get('name')}"
        if kind == "ref":
            target = self.objects.get(node.get("key"))
            if target is None:
                raise FormatError(f"{self.where}: reference to a missing object {str(node.get('key'))[:80]!r}")
            return self.value(target, depth + 1)
        if isinstance(kind, dict) and kind.get("type") == "pyref":
            type_name = f"{kind.get('module')}.{kind.get('name')}"
            items = node.get("items") or []
            if type_name in ("builtins.tuple", "builtins.list"):
                return [self.value(v, depth + 1) for _, v in items]
            if type_name == "builtins.dict":
                return {}  # no model field needs a dict's contents
            if type_name.startswith("fiddle.") and type_name.endswith((".Config", ".Partial")):
                return self.config(node, depth + 1)[1]
            return type_name
        raise FormatError(f"{self.where}: unknown serialized value of type {str(kind)[:80]!r}")

    def config(self, node, depth: int = 0) -> tuple[str, dict]:
        """(the configured class as 'module.name', its explicitly set arguments)."""
        metadata = self.value_of_metadata(node)
        fields = {}
        for item in node.get("items") or []:
            if not isinstance(item, list) or len(item) != 2:
                raise FormatError(f"{self.where}: a config item is not a [label, value] pair")
            fields[_attr_name(item[0], self.where)] = self.value(item[1], depth + 1)
        return metadata, fields

    def value_of_metadata(self, node) -> str:
        meta = node.get("metadata")
        if isinstance(meta, dict) and meta.get("type") == "ref":
            meta = self.objects.get(meta.get("key"))
        for item in (meta or {}).get("items") or []:
            if isinstance(item, list) and len(item) == 2 and item[0] == "Attr(name='fn_or_cls')":
                ref = item[1]
                if isinstance(ref, dict) and ref.get("type") == "pyref":
                    return f"{ref.get('module')}.{ref.get('name')}"
        raise FormatError(f"{self.where}: the model config names no class (fn_or_cls)")


def read_io_json(path: str) -> tuple[str, dict]:
    """(config class, explicit fields) of the model config in a NeMo 2 context/io.json."""
    graph = _FiddleGraph(load_json(path, "NeMo context"), path)
    node = graph.find(_MODEL_CONFIG_PATH)
    if node is None:
        raise FormatError(f"{path}: no object at {_MODEL_CONFIG_PATH} (the model's config)")
    return graph.config(node)


def read_model_yaml(path: str) -> tuple[str, dict]:
    data = load_yaml(path, f"put the model's Hugging Face {CONFIG} beside the checkpoint")
    config = data.get("config") if isinstance(data, dict) else None
    if not isinstance(config, dict) or not isinstance(config.get("_target_"), str):
        raise FormatError(f"{path}: no 'config' with a '_target_' (the model's config class)")
    fields = {}
    for key, value in config.items():
        if key.startswith("_"):
            continue
        if isinstance(value, dict) and "_target_" in value:
            value = value["_target_"]  # a callable or dtype, as fiddle's pyref
        fields[key] = value
    return config["_target_"], fields


# The defaults of the NeMo config classes pyconv knows, for the fields it reads (io.json lists
# only the arguments set explicitly). GPTConfig is Megatron-Core's TransformerConfig + GPTConfig.
_GPT_DEFAULTS = dict(
    normalization="LayerNorm", gated_linear_unit=False, activation_func="torch.nn.functional.gelu",
    add_bias_linear=True, add_qkv_bias=False, position_embedding_type="learned_absolute",
    share_embeddings_and_output_weights=True, layernorm_epsilon=1e-5, rotary_base=10000, rotary_percent=1.0,
    seq_length=1024, make_vocab_size_divisible_by=128, kv_channels=None, num_query_groups=None, vocab_size=None,
    num_moe_experts=None, moe_ffn_hidden_size=None, moe_router_topk=2, moe_router_pre_softmax=False,
    moe_shared_expert_intermediate_size=None, moe_shared_expert_gate=False, qk_layernorm=False)
_LLAMA_DEFAULTS = {**_GPT_DEFAULTS, "normalization": "RMSNorm", "gated_linear_unit": True,
                   "activation_func": "torch.nn.functional.silu", "add_bias_linear": False,
                   "position_embedding_type": "rope", "share_embeddings_and_output_weights": False, "seq_length": 4096}
_QWEN2_DEFAULTS = {**_LLAMA_DEFAULTS, "add_qkv_bias": True, "layernorm_epsilon": 1e-6, "rotary_base": 1000000.0,
                   "vocab_size": 151936}
_QWEN3_DEFAULTS = {**_QWEN2_DEFAULTS, "add_qkv_bias": False, "qk_layernorm": True, "kv_channels": 128,
                   "num_query_groups": 8}
_CLASS_DEFAULTS = (  # (class name prefix, defaults), first match wins
    ("Qwen3MoE", {**_QWEN3_DEFAULTS, "num_moe_experts": 128, "moe_router_topk": 8}),
    ("Qwen3", _QWEN3_DEFAULTS),
    ("Qwen2", _QWEN2_DEFAULTS),
    ("Qwen25", _QWEN2_DEFAULTS),
    ("Mixtral", {**_LLAMA_DEFAULTS, "num_moe_experts": 8, "rotary_base": 1000000.0}),
    ("Mistral", {**_LLAMA_DEFAULTS, "seq_length": 32768}),
    ("Llama", _LLAMA_DEFAULTS),
    ("CodeLlama", _LLAMA_DEFAULTS),
    ("GPTConfig", _GPT_DEFAULTS),
)
_SIZE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads")
_FIELD_TYPES = {
    **{k: (int,) for k in _SIZE_FIELDS + ("num_query_groups", "kv_channels", "seq_length", "vocab_size",
                                          "make_vocab_size_divisible_by", "num_moe_experts", "moe_ffn_hidden_size",
                                          "moe_router_topk", "moe_shared_expert_intermediate_size")},
    **{k: (int, float) for k in ("layernorm_epsilon", "rotary_base", "rotary_percent")},
    **{k: (bool,) for k in ("gated_linear_unit", "add_bias_linear", "add_qkv_bias", "qk_layernorm",
                            "share_embeddings_and_output_weights", "moe_router_pre_softmax", "moe_shared_expert_gate")},
    **{k: (str,) for k in ("normalization", "position_embedding_type", "activation_func")},
}


def nemo_config_to_args(cls: str, explicit: dict, where: str) -> dict:
    """A NeMo model config (class and explicit fields) as the Megatron-LM args the family tables read."""
    name = cls.rsplit(".", 1)[-1]
    defaults = next((d for prefix, d in _CLASS_DEFAULTS if name.startswith(prefix)), None)
    if defaults is None:
        raise FormatError(f"{where}: NeMo config class {cls} is not one pyconv knows "
                          f"({', '.join(p + '*' for p, _ in _CLASS_DEFAULTS)}); put the model's HF {CONFIG} beside it")
    c = {**defaults, **explicit}
    for key, kinds in _FIELD_TYPES.items():
        value = c.get(key)
        if value is not None and (not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)):
            raise FormatError(f"{where}: {name}.{key} is {str(value)[:60]!r}, not a "
                              f"{' or '.join(k.__name__ for k in kinds)}")
    missing = [k for k in _SIZE_FIELDS if not isinstance(c.get(k), int)]
    if missing:
        raise FormatError(f"{where}: {name} does not set {', '.join(missing)} (preset model sizes are not "
                          f"tabulated in pyconv); put the model's HF {CONFIG} beside the checkpoint")
    heads = c["num_attention_heads"]
    groups = c.get("num_query_groups") or heads
    activation = str(c.get("activation_func") or "")
    gated = bool(c.get("gated_linear_unit"))
    args = dict(
        num_layers=c["num_layers"], hidden_size=c["hidden_size"], ffn_hidden_size=c["ffn_hidden_size"],
        num_attention_heads=heads, num_query_groups=groups, group_query_attention=groups != heads,
        kv_channels=c.get("kv_channels") or c["hidden_size"] // heads, normalization=c["normalization"],
        swiglu=gated and activation.endswith(".silu"), add_bias_linear=bool(c["add_bias_linear"]),
        add_qkv_bias=bool(c["add_qkv_bias"]) or bool(c["add_bias_linear"]),
        position_embedding_type=c["position_embedding_type"], rotary_base=c["rotary_base"],
        rotary_percent=c.get("rotary_percent", 1.0), max_position_embeddings=c["seq_length"],
        seq_length=c["seq_length"], norm_epsilon=c["layernorm_epsilon"],
        untie_embeddings_and_output_weights=not c["share_embeddings_and_output_weights"],
        make_vocab_size_divisible_by=c.get("make_vocab_size_divisible_by") or 128, qk_layernorm=bool(c["qk_layernorm"]))
    if gated and not args["swiglu"]:
        raise FormatError(f"{where}: gated linear unit with activation {activation!r}: no pyconv family")
    if c.get("vocab_size"):
        args["vocab_size"] = c["vocab_size"]
    args.update(_rope_scaling_args(name, explicit, where))
    if c.get("num_moe_experts"):
        args.update(num_experts=c["num_moe_experts"], moe_ffn_hidden_size=c.get("moe_ffn_hidden_size")
                    or c["ffn_hidden_size"], moe_router_topk=c.get("moe_router_topk", 2),
                    moe_router_pre_softmax=bool(c.get("moe_router_pre_softmax")),
                    moe_shared_expert_intermediate_size=c.get("moe_shared_expert_intermediate_size"),
                    moe_shared_expert_gate=bool(c.get("moe_shared_expert_gate")))
    return args


def _rope_scaling_args(name: str, explicit: dict, where: str) -> dict:
    """Megatron-LM's rope scaling args of a NeMo config: Llama 3.x's (Llama31Config and the presets
    built on it: scale_factor and its low/high frequency factors and old context, which Megatron-Core
    fixes at 1, 4 and 8192) and linear position interpolation (seq_len_interpolation_factor)."""
    args = {}
    if explicit.get("seq_len_interpolation_factor"):
        args["rotary_seq_len_interpolation_factor"] = float(explicit["seq_len_interpolation_factor"])
    if name.startswith(("Llama31", "Llama32", "Llama33")) or "scale_factor" in explicit:
        if not isinstance(explicit.get("scale_factor"), (int, float)) or isinstance(explicit["scale_factor"], bool):
            raise FormatError(f"{where}: {name} applies Llama 3.x rope scaling with its preset's scale_factor, which "
                              f"pyconv does not tabulate; put the model's HF {CONFIG} beside the checkpoint")
        fixed = tuple(explicit.get(k, default) for k, default in (("low_freq_factor", 1.0), ("high_freq_factor", 4.0),
                                                                  ("old_context_len", 8192)))
        if fixed != (1.0, 4.0, 8192):
            raise FormatError(f"{where}: {name} scales rope with low/high frequency factors and old context {fixed}; "
                              "Megatron-Core applies 1, 4 and 8192 only")
        args.update(use_rope_scaling=True, rope_scaling_factor=float(explicit["scale_factor"]))
    return args


def _context_model(root: str, context: str, weights_vocab_rows: int, family: str | None):
    """(family, dims, HF config, where they came from)."""
    from pyconv.families import get_family
    from pyconv.families import family_for_architecture, family_for_megatron_args
    from pyconv.mcore.config import megatron_dims

    for candidate in (os.path.join(root, CONFIG), os.path.join(context, TOKENIZER_DIR, CONFIG)):
        if os.path.isfile(candidate):
            config = load_config(candidate)
            archs = config.get("architectures")
            if isinstance(archs, list) and archs:
                fam = get_family(family) if family else family_for_architecture(archs[0], candidate)
                return fam, fam.dims_from_hf(config), dict(config), os.path.relpath(candidate, root)
    io_json, model_yaml = os.path.join(context, IO_JSON), os.path.join(context, MODEL_YAML)
    if os.path.isfile(io_json):
        where = io_json
        cls, explicit = read_io_json(io_json)
    elif os.path.isfile(model_yaml):
        where = model_yaml
        cls, explicit = read_model_yaml(model_yaml)
    else:
        raise FormatError(f"{context}: neither {IO_JSON} nor {MODEL_YAML}: the model config is unknown")
    args = nemo_config_to_args(cls, explicit, where)
    args.setdefault("vocab_size", weights_vocab_rows)  # NeMo keeps the true vocabulary in the tokenizer
    fam = get_family(family) if family else family_for_megatron_args(args, where)
    return fam, megatron_dims(args, where), fam.hf_config_from_megatron(args), os.path.relpath(where, root)


def _embedding_rows(md, keys: dict[str, str], where: str) -> int:
    key = keys.get("embedding.word_embeddings.weight")
    if key is None:
        raise FormatError(f"{where}: no 'embedding.word_embeddings.weight' (as '{NEMO2_PREFIX}embedding."
                          "word_embeddings.weight')")
    return md.tensors[key].size[0]


# ---- reading ----------------------------------------------------------------------------------------

def _dcp_keys(md, weights: str, stack: str = "decoder") -> dict[str, str]:
    """Megatron-Core key -> the checkpoint's own key, for every model tensor of a DCP directory."""
    keys: dict[str, str] = {}
    for fqn in md.tensors:
        if fqn.startswith(OPTIMIZER_KEY_PREFIX):
            continue
        key = nemo_to_mcore_key(fqn, stack)
        if key in keys:
            raise FormatError(f"{weights}: '{keys[key]}' and '{fqn}' are both '{key}'")
        keys[key] = fqn
    return keys


def read(path: str, family: str | None = None) -> Catalog:
    from pyconv.mcore.dcp import check_backend, padded_vocab, read_tensors
    from pyconv.io.dcp import read_metadata

    root = os.path.abspath(path)
    if not _is_nemo2(root):
        return _read_nemo1(root, family)
    weights, context = os.path.join(root, WEIGHTS), os.path.join(root, CONTEXT)
    check_backend(weights)
    md = read_metadata(weights)
    keys = _dcp_keys(md, weights)
    fam, dims, config, config_source = _context_model(root, context, _embedding_rows(md, keys, weights), family)
    keys = _dcp_keys(md, weights, layer_stack(fam))
    padded = padded_vocab(fam, dims, md, weights, keys)
    tensors = read_tensors(md, weights, fam, dims, padded, keys)
    dtype = next((t.dtype for t in tensors.values()), None)
    if dtype in FLOAT_DTYPES:
        config["dtype"] = TORCH_NAME[dtype]
    details = {"family": fam.name, "padded_vocab_size": padded, "config_from": config_source,
               "chunks": sum(len(t.chunks) for t in md.tensors.values()),
               "key_style": "nemo2" if any(k.startswith(NEMO2_PREFIX) for k in keys.values()) else "nemo1"}
    return Catalog("nemo", root, tensors, config, fam.architectures[0], _tokenizer_files(root, context),
                   details=details)


def _tokenizer_files(root: str, context: str) -> tuple[tuple[str, int], ...]:
    """The tokenizer artifact's files (and small files beside the checkpoint), carried over to HF."""
    files: dict[str, tuple[str, int]] = {}
    for folder in (os.path.join(context, TOKENIZER_DIR), root):
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            file = os.path.join(folder, name)
            if name in files or name == CONFIG or name.startswith(".") or not os.path.isfile(file) \
                    or os.path.islink(file):
                continue
            files[name] = (file, os.path.getsize(file))
    return tuple(files.values())


# ---- NeMo 1 (an extracted .nemo archive) --------------------------------------------------------------

def nemo1_config_to_args(cfg: dict, where: str) -> dict:
    """NeMo 1's model_config.yaml (megatron_gpt_config.yaml's fields) as Megatron-LM args."""
    def need(key):
        if not isinstance(cfg.get(key), int) or isinstance(cfg.get(key), bool):
            raise FormatError(f"{where}: no integer '{key}'")
        return cfg[key]

    activation = str(cfg.get("activation", "gelu"))
    if activation not in ("gelu", "swiglu", "fast-swiglu"):
        raise FormatError(f"{where}: activation '{activation[:40]}' has no pyconv family (gelu, swiglu, fast-swiglu)")
    normalization = {"layernorm": "LayerNorm", "rmsnorm": "RMSNorm"}.get(str(cfg.get("normalization", "layernorm")))
    if normalization is None:
        raise FormatError(f"{where}: normalization '{str(cfg.get('normalization'))[:40]}' has no pyconv family "
                          "(layernorm, rmsnorm)")
    heads = need("num_attention_heads")
    groups = cfg.get("num_query_groups") or heads
    bias = bool(cfg.get("bias", True))
    positions = cfg.get("max_position_embeddings") or cfg.get("encoder_seq_length") or 0
    args = dict(
        num_layers=need("num_layers"), hidden_size=need("hidden_size"), ffn_hidden_size=need("ffn_hidden_size"),
        num_attention_heads=heads, num_query_groups=groups, group_query_attention=groups != heads,
        kv_channels=cfg.get("kv_channels") or need("hidden_size") // heads, normalization=normalization,
        swiglu=activation.endswith("swiglu"), add_bias_linear=bias, add_qkv_bias=bool(cfg.get("qkv_bias", bias)),
        position_embedding_type=str(cfg.get("position_embedding_type", "learned_absolute")),
        rotary_base=cfg.get("rotary_base", 10000), rotary_percent=cfg.get("rotary_percentage", 1.0),
        max_position_embeddings=positions, seq_length=positions, norm_epsilon=float(cfg.get("layernorm_epsilon", 1e-5)),
        untie_embeddings_and_output_weights=not cfg.get("share_embeddings_and_output_weights", True),
        make_vocab_size_divisible_by=cfg.get("make_vocab_size_divisible_by") or 128)
    if cfg.get("num_moe_experts"):
        args.update(num_experts=cfg["num_moe_experts"], moe_ffn_hidden_size=cfg.get("moe_ffn_hidden_size")
                    or args["ffn_hidden_size"], moe_router_topk=cfg.get("moe_router_topk", 2))
    return args


def _nemo1_state(state, file: str) -> dict:
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a Lightning .ckpt
    if not isinstance(state, dict):
        raise FormatError(f"{file}: not a state dict")
    return state


def _nemo1_rank_files(root: str, complete: bool = True) -> dict[tuple[int, int], str]:
    """(tp rank, pp rank) -> model_weights.ckpt: one file, mp_rank_TT/ (pp = 1) or
    tp_rank_TT_pp_rank_PPP/ directories, as NeMo 1 lays out model-parallel weights."""
    single = os.path.join(root, NEMO1_WEIGHTS_FILE)
    if os.path.isfile(single):
        return {(0, 0): single}
    files = {}
    for entry in sorted(os.listdir(root)):
        m = _NEMO1_RANK_DIR.match(entry)
        if not m or not os.path.isdir(os.path.join(root, entry)):
            continue
        rank = (int(m.group(1)), 0) if m.group(1) is not None else (int(m.group(2)), int(m.group(3)))
        file = os.path.join(root, entry, NEMO1_WEIGHTS_FILE)
        if not os.path.isfile(file):
            raise FormatError(f"{os.path.join(root, entry)}: no {NEMO1_WEIGHTS_FILE}")
        files[rank] = file
    if not files or not complete:
        return files
    tp, pp = (max(r[i] for r in files) + 1 for i in range(2))
    for t in range(tp):
        for p in range(pp):
            if (t, p) not in files:
                raise FormatError(f"{root}: the weights of tensor-parallel rank {t}, pipeline rank {p} are missing "
                                  f"(found tp={tp}, pp={pp})")
    return files


def _read_nemo1(root: str, family: str | None) -> Catalog:
    """An extracted NeMo 1 checkpoint: model_config.yaml and model_weights.ckpt (or its
    model-parallel rank directories, or a distributed model_weights/), keys under `model.` in
    Megatron-Core or pre-Megatron-Core (language_model) names."""
    from pyconv.families import get_family
    from pyconv.families import family_for_architecture, family_for_megatron_args
    from pyconv.mcore.assemble import Assembly, assembled_catalog, read_rank
    from pyconv.mcore.config import megatron_dims
    from pyconv.mcore.parallel import MegatronLayout
    from pyconv.mcore.dcp import padded_vocab, read_tensors
    from pyconv.io.dcp import read_metadata
    from pyconv.io.torchzip import TensorRef, read_torch_checkpoint
    from pyconv.layout import layer_stages

    where = os.path.join(root, NEMO1_CONFIG)
    hf_config = os.path.join(root, CONFIG)
    if os.path.isfile(hf_config):
        config = load_config(hf_config)
        fam = get_family(family) if family else family_for_architecture(config_architecture(config), hf_config)
        dims = fam.dims_from_hf(config)
        args = {**fam.megatron_args_from_hf(config, dims), "pyconv_hf_config": json.dumps(config)}
        config_source = CONFIG
    else:
        cfg = load_yaml(where, f"put the model's Hugging Face {CONFIG} beside it")
        if not isinstance(cfg, dict):
            raise FormatError(f"{where}: not a mapping")
        args, config_source = nemo1_config_to_args(cfg, where), NEMO1_CONFIG
        fam, dims = None, None
    details = {"config_from": config_source, "key_style": "nemo1"}

    weights_dir = os.path.join(root, NEMO1_WEIGHTS_DIR)
    if os.path.isdir(weights_dir):  # distributed: the torch_dist reader, keys under model.
        md = read_metadata(weights_dir)
        keys = _dcp_keys(md, weights_dir)
        args.setdefault("vocab_size", _embedding_rows(md, keys, weights_dir))
        fam = fam or (get_family(family) if family else family_for_megatron_args(args, where))
        dims = dims or megatron_dims(args, where)
        keys = _dcp_keys(md, weights_dir, layer_stack(fam))
        padded = padded_vocab(fam, dims, md, weights_dir, keys)
        tensors = read_tensors(md, weights_dir, fam, dims, padded, keys)
        config = fam.hf_config_from_megatron(args)
    else:
        files = _nemo1_rank_files(root)
        if not files:
            raise FormatError(f"{root}: no {NEMO1_WEIGHTS_FILE} (nor mp_rank_TT/ or tp_rank_TT_pp_rank_PPP/ holding "
                              f"one, nor {NEMO1_WEIGHTS_DIR}/)")
        tp, pp = (max(r[i] for r in files) + 1 for i in range(2))
        states = {rank: _nemo1_state(read_torch_checkpoint(file).obj, file) for rank, file in sorted(files.items())}

        def mapped(rank, stack):
            model = {}
            for key, value in states[rank].items():
                name = nemo_to_mcore_key(str(key), stack)
                if name in model:
                    raise FormatError(f"{files[rank]}: two tensors map to '{name}'")
                model[name] = value
            return {"model": model}

        embedding = mapped((0, 0), "decoder")["model"].get("embedding.word_embeddings.weight")
        if not isinstance(embedding, TensorRef):
            raise FormatError(f"{files[(0, 0)]}: no tensor 'model.language_model.embedding.word_embeddings.weight' "
                              "(or 'model.embedding.word_embeddings.weight')")
        padded = embedding.shape[0] * tp
        args.setdefault("vocab_size", padded)
        fam = fam or (get_family(family) if family else family_for_megatron_args(args, where))
        dims = dims or megatron_dims(args, where)
        layout = MegatronLayout(family=fam, dims=dims, padded_vocab=padded, stages=layer_stages(dims.num_layers, pp),
                                tp=tp, pp=pp, ep=1)
        assembly = Assembly({}, {}, [])
        for p in range(pp):
            for t in range(tp):
                read_rank(files[(t, p)], mapped((t, p), layer_stack(fam)), layout, t, p, 0, assembly)
        catalog = assembled_catalog(root, root, "release", layout, args, assembly)
        tensors, config = catalog.tensors, catalog.config
        details.update(tp=tp, pp=pp)
    dtype = next((t.dtype for t in tensors.values()), None)
    if dtype in FLOAT_DTYPES:
        config["dtype"] = TORCH_NAME[dtype]
    details.update(family=fam.name, padded_vocab_size=padded)
    return Catalog("nemo", root, tensors, config, fam.architectures[0], (), details=details)


# ---- writing ----------------------------------------------------------------------------------------

_TOKENIZER_CLASS = ("nemo.collections.common.tokenizers.huggingface.auto_tokenizer", "AutoTokenizer")
_TRAINER_CONTEXT = ("nemo.lightning.io.pl", "TrainerContext")
# The trainer NeMo's HF importers record (connector.nemo_setup); `load_context(path)` without a
# subpath builds it, and NeMo's exporters for Qwen2, Mistral, Gemma... load the context so.
_TRAINER = (("nemo.lightning.pytorch.trainer", "Trainer"),
            {"accelerator": "cpu", "devices": 1,
             "strategy": (("nemo.lightning.pytorch.strategies.megatron_strategy", "MegatronStrategy"),
                          {"ckpt_save_optimizer": False})})


class Pyref(str):
    """A value written as fiddle's pyref to 'module.name' (a function, a class, a torch dtype)."""


def nemo_vocab_divisor(vocab: int) -> int:
    """NeMo's HF importers: the largest power of two <= 128 that divides the vocabulary (no padding)."""
    base = 128
    while vocab % base:
        base //= 2
    return base


def _activation(config: dict, swiglu: bool) -> str:
    """The activation function NeMo's config names: SiLU under SwiGLU; GPT-2's tanh GELU as
    Megatron-Core's openai_gelu; the exact GELU otherwise."""
    if swiglu:
        return "torch.nn.functional.silu"
    name = config.get("activation_function") or config.get("hidden_act") or "gelu"
    if name in ("gelu_new", "gelu_fast", "gelu_pytorch_tanh"):
        return "megatron.core.transformer.utils.openai_gelu"
    return "torch.nn.functional.gelu"


def nemo_config_fields(family: Family, config: dict, dims, params_dtype: str) -> dict:
    """Every NeMo config field pyconv sets, from the family's Megatron args."""
    args = family.megatron_args_from_hf(config, dims)
    swiglu = bool(args.get("swiglu"))
    fields = dict(
        num_layers=args["num_layers"], hidden_size=args["hidden_size"], ffn_hidden_size=args["ffn_hidden_size"],
        num_attention_heads=args["num_attention_heads"], num_query_groups=args.get("num_query_groups") or
        args["num_attention_heads"], kv_channels=args.get("kv_channels"), normalization=args["normalization"],
        gated_linear_unit=swiglu, activation_func=Pyref(_activation(config, swiglu)),
        add_bias_linear=bool(args.get("add_bias_linear")), add_qkv_bias=bool(args.get("add_qkv_bias")),
        position_embedding_type=args["position_embedding_type"], rotary_base=float(args.get("rotary_base", 10000)),
        rotary_percent=float(args.get("rotary_percent", 1.0)), seq_length=args["seq_length"],
        layernorm_epsilon=float(args["norm_epsilon"]),
        share_embeddings_and_output_weights=not args["untie_embeddings_and_output_weights"],
        make_vocab_size_divisible_by=nemo_vocab_divisor(dims.vocab), vocab_size=dims.vocab,
        fp16=params_dtype == "F16", bf16=params_dtype == "BF16",
        params_dtype=Pyref(f"torch.{TORCH_NAME[params_dtype]}"))
    if args.get("qk_layernorm"):
        fields["qk_layernorm"] = True
    class_fields = _CLASS_FIELDS.get(family.nemo_classes[2])
    if class_fields is not None:
        fields.update(class_fields(args))
    if args.get("rotary_seq_len_interpolation_factor"):  # linear rope scaling: GPTConfig's own field
        fields["seq_len_interpolation_factor"] = float(args["rotary_seq_len_interpolation_factor"])
    if args.get("use_rope_scaling"):  # Llama 3.x: Llama31Config (nemo_config_class), Megatron-Core's fixed factors
        fields.update(scale_factor=float(args["rope_scaling_factor"]), low_freq_factor=1.0, high_freq_factor=4.0,
                      old_context_len=8192)
    if args.get("num_experts"):
        fields.update(num_moe_experts=args["num_experts"], moe_ffn_hidden_size=args["moe_ffn_hidden_size"],
                      moe_router_topk=args["moe_router_topk"],
                      moe_router_pre_softmax=bool(args.get("moe_router_pre_softmax")))
        if args.get("moe_shared_expert_intermediate_size"):
            fields.update(moe_shared_expert_intermediate_size=args["moe_shared_expert_intermediate_size"],
                          moe_shared_expert_gate=bool(args.get("moe_shared_expert_gate")))
    return fields


def nemo_config_class(family: Family, fields: dict) -> str:
    """The NeMo config class: the family's, or Llama31Config where Llama 3.x rope scaling is set
    (NeMo's LlamaConfig has no such fields; Llama31Config applies them in configure_model)."""
    name = family.nemo_classes[2]
    if "scale_factor" in fields:
        if name != "LlamaConfig":
            raise LayoutError(f"Llama 3.x rope scaling on {name}: NeMo applies it in Llama31Config only")
        return "Llama31Config"
    return name


def _gemma_common_fields(args: dict) -> dict:
    """What NeMo 2.5's Gemma configs set beyond GPTConfig's (gemma2.py / gemma3.py): 1 + weight
    norms, GeGLU with NeMo's openai_gelu."""
    return {"layernorm_zero_centered_gamma": True, "gated_linear_unit": True,
            "activation_func": Pyref("nemo.collections.llm.fn.activation.openai_gelu")}


def _gemma2_fields(args: dict) -> dict:
    """Gemma2Config as NeMo's HF importer fills it (HFGemmaImporter.config): window_size
    (sliding_window, 0), query_pre_attn_scalar, both soft caps."""
    window = args.get("window_size")
    scalar = float(args["query_pre_attn_scalar"])
    return {**_gemma_common_fields(args), "query_pre_attn_scalar": int(scalar) if scalar.is_integer() else scalar,
            "attn_logit_softcapping": args.get("attn_logit_softcapping"),
            "final_logit_softcapping": args.get("final_logit_softcapping"),
            "window_size": (int(window[0]) + 1, 0) if window else None}


def _gemma3_fields(args: dict) -> dict:
    """Gemma3Config: (local, global) rope bases, window_size in tokens, the (local, global)
    interleaved_attn_pattern (a full layer every local + global layers: HF's layer_types must be
    that periodic pattern), rope_scaling_factor, softmax_scale."""
    skip = args.get("window_attn_skip_freq")
    if not args.get("window_size") or not isinstance(skip, list) or 0 not in skip:
        raise LayoutError("NeMo 2's Gemma3Config alternates sliding and full layers; this model's layer_types do not")
    period = skip.index(0) + 1
    if skip != [int((i + 1) % period != 0) for i in range(len(skip))]:
        raise LayoutError(f"layer_types {['full' if not v else 'sliding' for v in skip]}: NeMo 2's Gemma3Config "
                          "places a full layer every interleaved_attn_pattern layers, no other pattern")
    return {**_gemma_common_fields(args), "qk_layernorm": True, "is_vision_language": False,
            "rotary_base": (float(args["rotary_base_local"]), float(args["rotary_base"])),
            "window_size": int(args["window_size"][0]) + 1, "interleaved_attn_pattern": (period - 1, 1),
            "rope_scaling_factor": float(args.get("rope_scaling_factor") or 1.0),
            "softmax_scale": float(args["softmax_scale"])}


# NeMo config classes whose fields go beyond GPTConfig's, by the class name a family table names.
_CLASS_FIELDS = {"Gemma2Config": _gemma2_fields, "Gemma3Config1B": _gemma3_fields}
# Where NeMo 2.5's own layers compute another model than the HF one from those fields (read in
# its gemma2.py / gemma3.py attention): said in the plan's notes, the weights being the same.
_CLASS_NOTES = {
    "Gemma2Config": "NeMo 2.5's Gemma 2 attention windows the even-numbered layers (1-based) over window_size[0] + 1 "
                    "tokens, as its HF importer sets it (sliding_window, 0); the HF model windows its layer_types' "
                    "sliding layers (the odd-numbered ones by default) over sliding_window tokens: on longer inputs "
                    "NeMo's outputs differ from the HF model's",
    "Gemma3Config1B": "NeMo 2.5's Gemma 3 attention windows its local layers over window_size + 1 tokens; the HF model over "
                    "sliding_window tokens: on longer inputs NeMo's outputs differ from the HF model's",
}


class _FiddleWriter:
    """fiddle's JSON serialization (format 0.0.1) of nested fdl.Config values, as
    `fiddle._src.experimental.serialization.dump_json` lays it out: every Config an object with
    its items, paths and a BuildableTraverserMetadata naming the class."""

    def __init__(self):
        self.objects: dict = {}
        self.refcounts: dict = {}

    def _name(self, hint: str) -> str:
        hint = re.sub(r"(?<=[^_A-Z])(?=[A-Z])", "_", hint).lower()
        i = 1
        while f"{hint}_{i}" in self.objects:
            i += 1
        return f"{hint}_{i}"

    def _ref(self, key: str) -> dict:
        self.refcounts[key] = self.refcounts.get(key, 0) + 1
        return {"type": "ref", "key": key}

    @staticmethod
    def _pyref(dotted: str) -> dict:
        module, name = dotted.rsplit(".", 1)
        return {"type": "pyref", "module": module, "name": name}

    def _container(self, kind: str, values: list, paths=None) -> dict:
        items = [[f"Index(index={i})", v] for i, v in enumerate(values)]
        node = {"type": self._pyref(f"builtins.{kind}"), "items": items, "metadata": None}
        if kind == "dict":
            node["metadata"] = {"type": self._pyref("builtins.tuple"), "items": [], "metadata": None}
        if paths is not None:
            node["paths"] = paths
        key = self._name(kind)
        self.objects[key] = node
        return self._ref(key)

    def config(self, cls: tuple[str, str], fields: dict, path: str) -> dict:
        """A fdl.Config(cls, **fields) at `path`; values: scalars, Pyref, nested (cls, fields)."""
        items = []
        for name, value in fields.items():
            child = f"{path}.{name}"
            if _is_nested_config(value):
                serialized = self.config(value[0], value[1], child)
            elif isinstance(value, tuple):  # a tuple of scalars (Gemma's window_size, rotary_base)
                serialized = self._container("tuple", [{"type": "leaf", "value": v, "paths": [f"{child}[{i}]"]}
                                                       for i, v in enumerate(value)], [child])
            elif isinstance(value, Pyref):
                serialized = {**self._pyref(value), "paths": [child]}
            elif isinstance(value, dict):
                serialized = self._container("dict", [], [child])
            else:
                serialized = {"type": "leaf", "value": value, "paths": [child]}
            items.append([f"Attr(name='{name}')", serialized])
        meta_key = self._name("BuildableTraverserMetadata")
        self.objects[meta_key] = None  # reserve the name before the containers take theirs
        names = self._container("tuple", list(fields))
        tags, history = self._container("dict", []), self._container("dict", [])
        self.objects[meta_key] = {
            "type": self._pyref("fiddle._src.config.BuildableTraverserMetadata"),
            "items": [["Attr(name='fn_or_cls')", self._pyref(".".join(cls))],
                      ["Attr(name='argument_names')", names], ["Attr(name='argument_tags')", tags],
                      ["Attr(name='argument_history')", history]],
            "metadata": self._pyref("fiddle._src.config.BuildableTraverserMetadata")}
        key = self._name(cls[1])
        self.objects[key] = {"type": self._pyref("fiddle._src.config.Config"), "items": items,
                             "metadata": self._ref(meta_key), "paths": [path]}
        return self._ref(key)

    def dump(self, cls: tuple[str, str], fields: dict) -> str:
        root = self.config(cls, fields, "<root>")
        return json.dumps({"root": root, "objects": self.objects, "refcounts": self.refcounts, "version": "0.0.1"},
                          indent=2)


def _is_nested_config(value) -> bool:
    """(class, fields): a nested fdl.Config, as opposed to a tuple of scalars."""
    return isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], tuple) and isinstance(value[1], dict)


def _yaml_scalar(value) -> str:
    """JSON scalars (numbers, true/false/null, quoted strings) are YAML, except that YAML 1.1
    (PyYAML) reads an exponent without a '.' ('1e-05') as a string: write '1.0e-05'."""
    text = json.dumps(value)
    if isinstance(value, float) and "e" in text and "." not in text.split("e")[0]:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}.0e{exponent}"
    return text


def model_yaml(model_cls: tuple[str, str], config_cls: tuple[str, str], fields: dict) -> str:
    lines = [f"_target_: {'.'.join(model_cls)}", "config:"]
    for name, value in [("_target_", None)] + sorted(fields.items()):
        if name == "_target_":
            lines.append(f"  _target_: {'.'.join(config_cls)}")
        elif isinstance(value, Pyref):
            lines += [f"  {name}:", "    _call_: false", f"    _target_: {value}"]
        else:
            lines.append(f"  {name}: {_yaml_scalar(value)}")
    lines += ["tokenizer:", f"  _target_: {'.'.join(_TOKENIZER_CLASS)}", f"  pretrained_model_name: {TOKENIZER_DIR}"]
    return "\n".join(lines) + "\n"


def plan_output(catalog: Catalog, target: TargetSpec) -> list[PlannedFile]:
    from pyconv.mcore.config import attention_notes, family_and_dims
    from pyconv.plan import PlannedFiles
    from pyconv.mcore.dcp import plan_dcp

    family, dims = family_and_dims(catalog)
    if family.nemo_classes is None:
        raise LayoutError(f"{catalog.architecture}: pyconv has no NeMo 2 model class for the {family.name} family")
    params_dtype = model_dtype(target.dtype, (t.dtype for t in catalog.tensors.values()))
    fields = nemo_config_fields(family, catalog.config, dims, params_dtype)
    module, model_name, _ = family.nemo_classes
    config_name = nemo_config_class(family, fields)
    # No vocabulary padding (as NeMo's importers): the embedding keeps the true vocabulary.
    files = PlannedFiles(plan_dcp(catalog, target, family, dims, dims.vocab, WEIGHTS, {}, key_prefix=NEMO2_PREFIX))
    files.notes = attention_notes(catalog.config, fields)  # Gemma's window is in the fields
    if config_name in _CLASS_NOTES and fields.get("window_size"):
        files.notes += (_CLASS_NOTES[config_name],)
    model_fields = {"config": ((module, config_name), fields),
                    "tokenizer": (_TOKENIZER_CLASS, {"pretrained_model_name": TOKENIZER_DIR})}
    context = {"model": ((module, model_name), model_fields), "trainer": _TRAINER, "extra": {}}
    io_json = _FiddleWriter().dump(_TRAINER_CONTEXT, context)
    files.append(plan_text_file(f"{CONTEXT}/{IO_JSON}", io_json))
    files.append(plan_text_file(f"{CONTEXT}/{MODEL_YAML}",
                                model_yaml((module, model_name), (module, config_name), fields)))
    config = dict(catalog.config)
    if target.dtype in FLOAT_DTYPES:
        config["dtype"] = TORCH_NAME[target.dtype]
    files.append(plan_text_file(f"{CONTEXT}/{TOKENIZER_DIR}/{CONFIG}", json.dumps(config, indent=2, sort_keys=True)))
    for path, size in catalog.extra_files:
        name = os.path.basename(path)
        if name != CONFIG:
            files.append(plan_file_copy(path, size, f"{CONTEXT}/{TOKENIZER_DIR}/{name}"))
    return files
