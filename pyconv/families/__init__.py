"""Model families: one declarative table each, mapping Hugging Face names to Megatron-Core
names with the shard rule that splits them. Registered by architecture, resolved lazily."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Callable

from pyconv.errors import FormatError, LayoutError
from pyconv.families.patterns import PatternIndex

# Shard rules (pyconv.layout.rules): how a tensor is split over tensor-parallel ranks, both ways.
from pyconv.layout.rules import (  # noqa: E402,F401  (re-exported for the family tables)
    COLUMN, GATED_FC1, LATENT_DOWN, QKV, REPLICATED, ROW, VOCAB, ShardRule,
)
# Where a tensor lives in the pipeline. MTP: a multi-token-prediction layer's own tensors (on the
# last stage; '*' is the MTP layer's index there and num_hidden_layers + index in HF names).
FIRST_STAGE, LAYER, LAST_STAGE, MTP = "first", "layer", "last", "mtp"


MEGATRON_LAYER_PREFIX = "decoder.layers.*."
MTP_TRANSFORMER_PREFIX = "mtp.layers.*.transformer_layer."


@dataclass(frozen=True)
class ModelDims:
    num_layers: int
    hidden: int
    heads: int
    groups: int      # num_key_value_heads / num_query_groups
    head_dim: int    # kv_channels
    ffn: int
    vocab: int       # the true vocabulary size
    max_positions: int = 0
    tied: bool = False
    num_experts: int = 0      # routed experts (0: a dense model)
    moe_ffn: int = 0          # each routed expert's ffn size
    shared_ffn: int = 0       # the shared expert's ffn size (0: none)
    first_dense_layers: int = 0  # leading layers with a dense MLP (DeepSeek's first_k_dense_replace)
    # Multi-latent attention (DeepSeek-V2/V3); q_lora_rank 0: no query compression (q_proj).
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_dim: int = 0      # Megatron's qk_head_dim
    qk_rope_dim: int = 0      # Megatron's qk_pos_emb_head_dim
    v_head_dim: int = 0
    mtp_layers: int = 0       # multi-token-prediction layers (DeepSeek's num_nextn_predict_layers)
    # DeepSeek sparse attention's indexer (DeepSeek-V3.2): its heads and head size (0: none)
    index_heads: int = 0
    index_head_dim: int = 0

    def layer_kind(self, layer: int) -> str:
        """'moe' where the MLP is a mixture of experts, else 'dense'."""
        return "moe" if self.num_experts and layer >= self.first_dense_layers else "dense"


@dataclass(frozen=True)
class TensorMapping:
    """HF pattern(s) -> Megatron-Core pattern; '*' stands for the layer index and '#' for the
    expert index (global in HF names, local to the expert-parallel rank in Megatron names).

    Fused tensors list several HF names (q, k, v or gate, up); a single HF name under the
    qkv rule holds [q; k; v] already stacked (GPT-2's c_attn). `megatron` is one name, or
    {"te": ..., "local": ...} where TransformerEngine fuses a norm into the next linear.
    `transposed`: HF stores the weight [in, out] (Conv1D) where Megatron stores [out, in].
    `shape`: the HF shape of each HF tensor, from the model dims. `layers`: which layers
    carry it ('all', 'dense' or 'moe' MLPs)."""

    hf: tuple[str, ...]
    megatron: str | dict[str, str]
    rule: ShardRule
    where: str
    shape: Callable[[ModelDims], tuple[int, ...]]
    optional: bool = False
    transposed: bool = False
    layers: str = "all"
    # Present only in models whose dims satisfy this (e.g. q_a_proj only with a q_lora_rank).
    needs: Callable[[ModelDims], bool] | None = None
    # Never cast by --dtype (Megatron-Core keeps the router's expert_bias in float32).
    keep_dtype: bool = False

    @property
    def per_expert(self) -> bool:
        return "#" in self.hf[0]

    def applies_to(self, dims: ModelDims, layer: int | None) -> bool:
        if self.needs is not None and not self.needs(dims):
            return False
        return self.layers == "all" or layer is None or dims.layer_kind(layer) == self.layers

    def megatron_name(self, naming: str) -> str:
        return self.megatron if isinstance(self.megatron, str) else self.megatron[naming]

    def megatron_names(self) -> tuple[str, ...]:
        return (self.megatron,) if isinstance(self.megatron, str) else tuple(dict.fromkeys(self.megatron.values()))


def _indices(match: re.Match) -> tuple[int | None, int | None]:
    groups = match.groupdict()
    layer, expert = groups.get("layer"), groups.get("expert")
    return (int(layer) if layer is not None else None), (int(expert) if expert is not None else None)


@dataclass
class Family:
    name: str
    architectures: tuple[str, ...]
    mappings: tuple[TensorMapping, ...]
    dims_from_hf: Callable[[dict], ModelDims]
    megatron_args_from_hf: Callable[[dict, ModelDims], dict]
    hf_config_from_megatron: Callable[[dict], dict]
    # How the family is recognised from Megatron args alone (a checkpoint that does not carry its
    # HF config): the features (megatron_features(args)) it always has, and those it may have.
    # Two families whose features could match one args are refused when registered.
    megatron_features: frozenset[str] | None = None
    megatron_optional: frozenset[str] = frozenset()
    # NeMo 2: (module, model class, config class) of the family's model; None: not written.
    nemo_classes: tuple[str, str, str] | None = None
    # Legacy (pre-Megatron-Core) Megatron-LM: the transformer block's name in Megatron-Core terms
    # (GPTModel's `decoder`, BertModel's `encoder`); None: no legacy checkpoints of this family.
    legacy_megatron_stack: str | None = None
    # MindSpore Transformers names this family's (Llama-like) tensors.
    mindformers: bool = False
    # DeepSeek's inference layout (its convert.py's name table) covers this family.
    deepseek_inference: bool = False
    ignored_hf: tuple[str, ...] = ()  # HF buffers that are not weights (e.g. rotary inv_freq)
    # HF layers with index >= num_hidden_layers (DeepSeek-V3's multi-token-prediction layers) are
    # not part of the model Megatron runs: dropped (and said so) instead of refused.
    drops_extra_layers: bool = False
    # Multi-token-prediction layers, Megatron-Core's `mtp.layers.N.`: its own tensors before and
    # after its transformer layer (`transformer_layer.` + a decoder layer's names).
    mtp_before: tuple[TensorMapping, ...] = ()
    mtp_after: tuple[TensorMapping, ...] = ()
    # Why the family's Megatron layers are the model at tp 1 only (None: any tp Megatron-Core allows).
    single_tp: str | None = None
    # Why Megatron-Core builds the family with TransformerEngine's layer names only (None: both namings).
    te_names_only: str | None = None
    # HF tensors of each MTP layer that copy a model tensor ({leaf name: the model tensor's HF name});
    # Megatron-Core shares the model's instead of holding them.
    mtp_hf_copies: dict = field(default_factory=dict)

    def __post_init__(self):
        hf_patterns, megatron_patterns = [], []
        for m in self.mappings + self.mtp_before + self.mtp_after:
            patterns = list(m.hf) + list(m.megatron_names())
            stars = {p.count("*") for p in patterns}
            experts = {p.count("#") for p in patterns}
            expected = 1 if m.where in (LAYER, MTP) else 0
            if stars != {expected} or len(experts) != 1 or experts - {0, 1}:
                raise ValueError(f"family {self.name}: mapping {m.hf} -> {m.megatron} has wildcard counts "
                                 f"{stars} (layer) and {experts} (expert), expected {expected} and one of 0/1")
            if m.where == MTP:  # matched by match_mtp_hf only: other formats drop MTP layers whole
                continue
            hf_patterns += [(p, (m, i)) for i, p in enumerate(m.hf)]
            megatron_patterns += [(naming_name, m) for naming_name in m.megatron_names()]
        self._hf_index = PatternIndex(hf_patterns)
        self._megatron_index = PatternIndex(megatron_patterns)
        self._mtp_index = PatternIndex([(p, (m, i)) for m in self.mtp_before + self.mtp_after for i, p in enumerate(m.hf)])
        self._mtp_variants: dict[int, TensorMapping] = {}
        self._ignored_index = PatternIndex([(p, None) for p in self.ignored_hf])

    @property
    def word_embedding(self) -> TensorMapping:
        """The mapping of the word embedding (the vocabulary-split tensor of the first stage)."""
        return next(m for m in self.mappings if m.where == FIRST_STAGE and m.rule.pads_vocab)

    def match_mtp_hf(self, name: str):
        """(mapping, index, layer, expert) of an MTP layer's own HF tensor (enorm, eh_proj...), or None."""
        found = self._mtp_index.first(name)
        return None if found is None else (*found[1], *_indices(found[0]))

    def mtp_layer_mappings(self, dims: ModelDims) -> list[TensorMapping]:
        """The mappings of one multi-token-prediction layer (HF layer num_layers + i, Megatron's
        mtp.layers.i), in Megatron-Core's state-dict order: its own input tensors, its
        transformer layer (a decoder layer of the kind HF's layer index gives), its final norm."""
        layer = dims.num_layers  # every MTP layer is of the kind the layers past the last one are
        return [*self.mtp_before,
                *(self.mtp_variant(m) for m in self.mappings if m.where == LAYER and m.applies_to(dims, layer)),
                *self.mtp_after]

    def mtp_variant(self, mapping: TensorMapping) -> TensorMapping:
        """A decoder-layer mapping as the MTP layer's transformer layer holds it in Megatron-Core:
        `decoder.layers.*.X` -> `mtp.layers.*.transformer_layer.X` ('*' the MTP index)."""
        found = self._mtp_variants.get(id(mapping))
        if found is None:
            def rename(name: str) -> str:
                return name.replace(MEGATRON_LAYER_PREFIX, MTP_TRANSFORMER_PREFIX, 1)

            megatron = (rename(mapping.megatron) if isinstance(mapping.megatron, str)
                        else {k: rename(v) for k, v in mapping.megatron.items()})
            found = self._mtp_variants[id(mapping)] = replace(mapping, megatron=megatron, where=MTP)
        return found

    def match_hf(self, name: str, dims: ModelDims | None = None):
        """(mapping, index of the name among the mapping's HF names, layer, expert), or None.
        With dims, a mapping that applies to the layer is preferred (the same HF name can map
        differently in dense and MoE layers)."""
        found = None
        for m, (mapping, index) in self._hf_index.matches(name):
            match = (mapping, index, *_indices(m))
            if dims is None or mapping.applies_to(dims, match[2]):
                return match
            found = found or match
        return found

    def match_megatron(self, name: str):
        """(mapping, local layer, local expert), or None."""
        found = self._megatron_index.first(name)
        return None if found is None else (found[1], *_indices(found[0]))

    def is_ignored_hf(self, name: str) -> bool:
        return self._ignored_index.first(name) is not None


_FAMILIES: dict[str, Family] = {}


@dataclass(frozen=True)
class LanguageModelOf:
    """A multimodal architecture whose language model is a family's text model: a Megatron-style
    target cannot hold its other parts (pyconv writes GPTModel layouts), so it converts HF -> HF
    whole, or its language model alone (`--language-model`), as `text_architecture`."""

    architecture: str                      # e.g. Gemma3ForConditionalGeneration
    text_architecture: str                 # e.g. Gemma3ForCausalLM
    renames: tuple[tuple[str, str], ...]   # (prefix of the language model's tensors, the text model's)
    other_parts: tuple[str, ...]           # prefixes of the parts left out (vision tower, projector...)
    described: str                         # those parts, in words, for messages
    config_key: str = "text_config"        # where the language model's config sits


_MULTIMODAL: dict[str, LanguageModelOf] = {}


def register_multimodal(entry: LanguageModelOf) -> LanguageModelOf:
    _MULTIMODAL[entry.architecture] = entry
    return entry


def multimodal_entry(architecture: str | None) -> LanguageModelOf | None:
    _load_builtin()
    return _MULTIMODAL.get(architecture)


def register_family(family: Family) -> Family:
    for other in _FAMILIES.values():
        if other.name != family.name and _features_overlap(family, other):
            raise ValueError(f"family {family.name}: Megatron args with features "
                             f"{sorted(family.megatron_features | other.megatron_features)} would match both it "
                             f"and {other.name}: make one's features tell them apart")
    _FAMILIES[family.name] = family
    return family


def megatron_features(args: dict) -> frozenset[str]:
    """What Megatron args say about a model's architecture, as names a family table declares.
    Megatron-LM saves every argument, defaults included, so only what is set counts; a bias on
    the q/k/v projections only (Qwen's) differs from a bias on every linear (which covers q/k/v)."""
    f = set()
    if args.get("normalization", "LayerNorm") == "LayerNorm":
        f.add("layernorm")
    elif args.get("normalization") == "RMSNorm":
        f.add("rmsnorm")
    if args.get("position_embedding_type"):
        f.add("pos_" + str(args["position_embedding_type"]))
    flags = {"swiglu": "swiglu", "add_bias_linear": "linear_bias", "qk_layernorm": "qk_layernorm",
             "multi_latent_attention": "mla", "bert_binary_head": "bert"}
    f.update(feature for arg, feature in flags.items() if args.get(arg))
    if args.get("gated_linear_unit") and not args.get("swiglu"):  # GeGLU (Gemma)
        f.add("glu")
    if args.get("experimental_attention_variant") == "dsa":  # DeepSeek sparse attention (V3.2)
        f.add("dsa")
    if args.get("qk_layernorm_whole_projection"):  # q/k norms over the whole projection (OLMo 2, OLMoE)
        f.add("qk_whole_projection")
    if args.get("post_layernorm"):  # norms after the attention and the MLP, none before (OLMo 2)
        f.add("post_layernorm")
    if args.get("apply_layernorm_1p"):  # norms scale by 1 + weight (Gemma)
        f.add("norm_1p")
    if args.get("add_qkv_bias") and not args.get("add_bias_linear"):
        f.add("qkv_bias")
    if float(args.get("rotary_percent") or 1.0) < 1.0 and args.get("position_embedding_type") == "rope":
        f.add("partial_rotary")
    skip = args.get("no_rope_freq")
    if skip and (isinstance(skip, int) or any(skip)):
        f.add("no_rope")
    if str(args.get("tokenizer_type") or "").startswith("BertWordPiece"):
        f.add("bert")
    if args.get("num_experts"):
        f.add("moe")
        if args.get("moe_shared_expert_intermediate_size"):
            f.add("shared_expert")
        if args.get("moe_shared_expert_gate"):
            f.add("shared_expert_gate")
        if args.get("moe_router_enable_expert_bias"):
            f.add("expert_bias")
        if args.get("moe_router_score_function"):
            f.add(str(args["moe_router_score_function"]) + "_router")
    return frozenset(f)


def _accepts(family: Family, features: frozenset[str]) -> bool:
    required = family.megatron_features
    return required is not None and required <= features <= required | family.megatron_optional


def _features_overlap(a: Family, b: Family) -> bool:
    """Whether some set of features would be accepted by both families."""
    if a.megatron_features is None or b.megatron_features is None:
        return False
    union = a.megatron_features | b.megatron_features
    return union <= (a.megatron_features | a.megatron_optional) & (b.megatron_features | b.megatron_optional)


_BUILTIN_LOADED = False


def _load_builtin() -> None:
    """Imports every family table in this package once: a new family is one new file here."""
    global _BUILTIN_LOADED
    if _BUILTIN_LOADED:
        return
    _BUILTIN_LOADED = True
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


def family_names() -> list[str]:
    _load_builtin()
    return sorted(_FAMILIES)


def get_family(name: str) -> Family:
    _load_builtin()
    if name not in _FAMILIES:
        raise LayoutError(f"unknown model family '{name}' (known: {', '.join(sorted(_FAMILIES))})")
    return _FAMILIES[name]


def family_for_architecture(architecture: str | None, where: str) -> Family:
    _load_builtin()
    for family in _FAMILIES.values():
        if architecture in family.architectures:
            return family
    if architecture in _MULTIMODAL:
        entry = _MULTIMODAL[architecture]
        raise FormatError(f"{where}: {architecture}: {entry.described} have no place in a Megatron-Core GPTModel "
                          f"checkpoint; convert its language model alone with --language-model (written as "
                          f"{entry.text_architecture}), or HF -> HF, which keeps every part as stored")
    known = sorted(a for f in _FAMILIES.values() for a in f.architectures)
    raise FormatError(f"{where}: architecture '{architecture}' has no pyconv family table (known: {', '.join(known)})")


def families_with(predicate) -> list[Family]:
    """The registered families a table field selects, e.g. families_with(lambda f: f.mindformers)."""
    _load_builtin()
    return [f for f in _FAMILIES.values() if predicate(f)]


def family_for_megatron_args(args: dict, where: str) -> Family:
    _load_builtin()
    features = megatron_features(args)
    found = [f for f in _FAMILIES.values() if _accepts(f, features)]
    if len(found) != 1:
        raise FormatError(f"{where}: cannot tell the model family from the Megatron args "
                          f"({'several match: ' + ', '.join(f.name for f in found) if found else 'none matches'}); "
                          f"name the family")
    return found[0]


def hf_int(config: dict, key: str, where: str = "config.json", default=None) -> int:
    value = config.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise FormatError(f"{where}: '{key}' must be an integer, got {value!r}")
    return value


def kept_dtypes(catalog) -> frozenset[str]:
    """Tensors the family table keeps in their own dtype through a cast: DeepSeek-V3's routing
    bias stays float32, as DeepSeek's fp8_cast_bf16.py and Megatron-Core keep it (a rounded bias
    can change which experts a token goes to). None for an architecture without a table."""
    try:
        family = family_for_architecture(catalog.architecture, catalog.path)
    except FormatError:
        return frozenset()
    return frozenset(n for n in catalog.tensors if (m := family.match_hf(n)) is not None and m[0].keep_dtype)
