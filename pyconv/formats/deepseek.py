"""DeepSeek-V3's model-parallel inference layout, as its `inference/convert.py` writes it.

    DIR/model{i}-mp{N}.safetensors    i = 0..N-1, one file per model-parallel rank
    DIR/*token*                       the source directory's tokenizer files, copied verbatim

Every file is byte for byte what `safetensors.torch.save_file(state_dict_i, path)` writes for
the script's state dict of rank i. Per Hugging Face tensor the script does:

    model.layers.3.self_attn.q_b_proj.weight_scale_inv
      strip "model.", then in this order replace every "self_attn" -> "attn", "mlp" -> "ffn",
      "weight_scale_inv" -> "scale", "e_score_correction_bias" -> "bias"
    layers.3.attn.q_b_proj.scale
      key = second-to-last component ("q_b_proj"), looked up in MAPPING, every occurrence of
      the key replaced by its new name
    layers.3.attn.wq_b.scale            split along dim 0 like its weight (same key)

    routed expert (name has "experts", not "shared_experts"): expert E = third-to-last
      component, stored whole on rank E // (n_routed_experts / N)
    a key with a dim: the N equal parts along that dim, part i on rank i
    a key with dim None: the whole tensor on every rank
    layers with index >= num_hidden_layers (multi-token-prediction layers): dropped

The script holds every rank in memory; here each file is a plan of block copies from the
canonical tensors (a dim-0 part is a row range of the [prod(shape[:-1]), shape[-1]] view, a
dim-1 part of a matrix a column range), so memory stays at the executor's buffer budget.

Where the script would silently produce something wrong, this refuses with a LayoutError: two
tensors landing on one name (the script keeps whichever file glob listed last), an expert index
outside n_routed_experts (the script drops it), an fp8 weight whose rank boundary falls inside a
128 x 128 scale block (the script slices the scales anyway, so they no longer match the weights).

The script writes no config.json; this writer puts the model's Hugging Face config.json beside
the files (with num_nextn_predict_layers 0 when the MTP layers were dropped), so that pyconv reads
the directory back. DeepSeek's generate.py takes its own --config and does not look at it. A
directory convert.py wrote needs the model's config.json copied into it to be read.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
from dataclasses import dataclass

from pyconv.catalog import CanonicalTensor, Catalog, SourceBlock, StoredTensor, view2d
from pyconv.errors import FormatError, LayoutError
from pyconv.dtypes import output_dtypes
from pyconv.fp8 import FP8_BLOCK, SCALE_SUFFIX
from pyconv.io.hfdir import CONFIG, extra_files, updated_config
from pyconv.io.jsonfile import config_architecture, load_config
from pyconv.io.safetensors import layout_like_save_file, read_safetensors
from pyconv.plan import (BlockCopy, PlannedFile, PlannedFiles, PlannedTensor, TargetSpec, copies_for_region,
                         plan_file_copy, plan_text_file)

# convert.py's table: Hugging Face module name -> (DeepSeek module name, dim split across ranks,
# None: the whole tensor on every rank).
MAPPING: dict[str, tuple[str, int | None]] = {
    "embed_tokens": ("embed", 0),
    "input_layernorm": ("attn_norm", None),
    "post_attention_layernorm": ("ffn_norm", None),
    "q_proj": ("wq", 0),
    "q_a_proj": ("wq_a", None),
    "q_a_layernorm": ("q_norm", None),
    "q_b_proj": ("wq_b", 0),
    "kv_a_proj_with_mqa": ("wkv_a", None),
    "kv_a_layernorm": ("kv_norm", None),
    "kv_b_proj": ("wkv_b", 0),
    "o_proj": ("wo", 1),
    "gate": ("gate", None),
    "gate_proj": ("w1", 0),
    "down_proj": ("w2", 1),
    "up_proj": ("w3", 0),
    "norm": ("norm", None),
    "lm_head": ("head", 0),
    "scale": ("scale", None),
    # DeepSeek-V3.2's indexer (DeepSeek-V3.2-Exp's convert.py @3b99a53): whole on every rank, names kept
    "wq_b": ("wq_b", None),
    "wk": ("wk", None),
    "k_norm": ("k_norm", None),
    "weights_proj": ("weights_proj", None),
}
_INDEXER_KEYS = ("wq_b", "wk", "k_norm", "weights_proj")
# The new names are distinct but for the indexer's wq_b (q_b_proj's too): told apart by 'indexer'.
_HF_KEY = {new: old for old, (new, _) in MAPPING.items() if old not in _INDEXER_KEYS}
# The script's substring renames, in its order; each replaces every occurrence.
_RENAMES = (("self_attn", "attn"), ("mlp", "ffn"), ("weight_scale_inv", "scale"), ("e_score_correction_bias", "bias"))
_HF_PREFIX = "model."

_FILE_NAME = re.compile(r"^model(\d+)-mp(\d+)\.safetensors$")
_LAYER = re.compile(r"^model\.layers\.(\d+)(?:\.|$)")
_TOKENIZER_GLOB = "*token*"
_FP8_DTYPES = ("F8_E4M3", "F8_E5M2")


@dataclass(frozen=True)
class Options:
    tp: int = 1  # model-parallel ranks (DeepSeek's --model-parallel)



def file_name(rank: int, mp: int) -> str:
    return f"model{rank}-mp{mp}.safetensors"


def deepseek_name(hf_name: str) -> tuple[str, str]:
    """(DeepSeek name, mapping key) of a Hugging Face tensor name, by convert.py's steps, side
    effects included: its `str.replace` calls rewrite every occurrence anywhere in the name
    (a module called "my_mlp_x" becomes "my_ffn_x"; a key that also occurs earlier in the name
    is replaced there too). Raises LayoutError when the key is not in the table."""
    name = hf_name[len(_HF_PREFIX):] if hf_name.startswith(_HF_PREFIX) else hf_name
    for old, new in _RENAMES:
        name = name.replace(old, new)
    parts = name.split(".")
    key = parts[-2] if len(parts) >= 2 else None
    if key not in MAPPING:
        raise LayoutError(f"tensor {hf_name}: DeepSeek's mapping table has no entry for its key "
                          f"{key!r} (second-to-last component of {name!r}); known: {', '.join(MAPPING)}")
    return name.replace(key, MAPPING[key][0]), key


def hf_name_for(ds_name: str, path: str) -> tuple[str, str]:
    """(Hugging Face name, mapping key) of a DeepSeek tensor name: the inverse of deepseek_name,
    component by component ("attn_norm" must not become "self_attn_norm"), checked by renaming
    the result forward again. `gate.bias` is read as the router's e_score_correction_bias."""
    parts = ds_name.split(".")
    indexer = len(parts) >= 3 and parts[-3] == "indexer" and parts[-2] in _INDEXER_KEYS
    if len(parts) < 2 or not (indexer or parts[-2] in _HF_KEY):
        raise FormatError(f"{path}: tensor '{ds_name}' is not a DeepSeek inference name "
                          f"(its second-to-last component is not one of {', '.join(_HF_KEY)})")
    key = parts[-2] if indexer else _HF_KEY[parts[-2]]
    last = parts[-1]
    if last == "scale":
        last = "weight_scale_inv"
    elif last == "bias" and key == "gate":
        last = "e_score_correction_bias"
    middle = [{"attn": "self_attn", "ffn": "mlp"}.get(p, p) for p in parts[:-2]]
    hf_name = ".".join(middle + [key, last])
    if key != "lm_head":
        hf_name = _HF_PREFIX + hf_name
    try:
        forward, _ = deepseek_name(hf_name)
    except LayoutError:
        forward = None
    if forward != ds_name:
        raise FormatError(f"{path}: tensor '{ds_name}' has no Hugging Face name that convert.py maps to it")
    return hf_name, key


def _routed_expert(ds_name: str) -> bool:
    return "experts" in ds_name and "shared_experts" not in ds_name


def _expert_index(ds_name: str) -> int | None:
    parts = ds_name.split(".")
    if len(parts) >= 3 and parts[-3].isascii() and parts[-3].isdigit():
        return int(parts[-3])
    return None


# ---- block geometry: one part of a tensor split into equal parts along a dim ----------------

def _part_rows(shape: tuple[int, ...], dim: int) -> tuple[int, int]:
    """For a split along a dim before the last (or a vector's only dim), each index of the dims
    before it holds one row range of the 2-D view per part: (outer count, rows per unit of dim)."""
    return math.prod(shape[:dim]), math.prod(shape[dim + 1:-1])


def _splits_columns(shape: tuple[int, ...], dim: int) -> bool:
    return len(shape) >= 2 and dim == len(shape) - 1


def part_copies(tensor: CanonicalTensor, dim: int, parts: int, index: int,
                dtype: str | None = None) -> tuple[BlockCopy, ...]:
    """Block copies of part `index` of `parts` equal parts of the tensor along `dim`, as
    `tensor.narrow(dim, index * size, size).contiguous()` lays it out.

        dim = last (matrix, dim 1):   [ . . |##| . . ]   one column range of every row
        dim < last (dim 0, vectors):  rows [index*size, +size) of the view (per outer index)
    """
    shape = tensor.shape
    size = shape[dim] // parts
    rows, cols = view2d(shape)
    if rows * cols == 0:
        return ()
    if _splits_columns(shape, dim):
        return tuple(copies_for_region(tensor, 0, index * size, rows, size, dtype=dtype))
    outer, unit = _part_rows(shape, dim)
    copies: list[BlockCopy] = []
    for o in range(outer):
        copies += copies_for_region(tensor, (o * shape[dim] + index * size) * unit, 0, size * unit, cols,
                                    dst_row=o * size * unit, dtype=dtype)
    return tuple(copies)


def part_blocks(stored: StoredTensor, dim: int, index: int, full_shape: tuple[int, ...]) -> list[SourceBlock]:
    """Where part `index` (stored whole in a rank file) lies in the canonical tensor's 2-D view."""
    size = stored.shape[dim]
    rows, cols = view2d(stored.shape)
    if _splits_columns(full_shape, dim):
        return [SourceBlock(stored, 0, 0, rows, cols, 0, index * size)]
    outer, unit = _part_rows(full_shape, dim)
    return [SourceBlock(stored, o * size * unit, 0, size * unit, cols, (o * full_shape[dim] + index * size) * unit, 0)
            for o in range(outer)]


# ---- writer ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class _RankTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    copies: tuple[BlockCopy, ...]


def _config_int(config: dict, key: str, required: bool) -> int | None:
    value = config.get(key)
    if value is None and not required:
        return None
    if type(value) is not int or value < 0:
        raise LayoutError(f"config.json: '{key}' must be a non-negative integer for the deepseek layout, got {value!r}")
    return value


def _fp8_block(config: dict) -> tuple[int, int]:
    quant = config.get("quantization_config")
    block = quant.get("weight_block_size") if isinstance(quant, dict) else None
    if isinstance(block, list) and len(block) == 2 and all(type(b) is int and b > 0 for b in block):
        return block[0], block[1]
    return FP8_BLOCK, FP8_BLOCK


def _check_split(catalog: Catalog, tensor: CanonicalTensor, ds_name: str, dim: int, mp: int,
                 block: tuple[int, int], dequantized: set[str]) -> None:
    # An fp8 weight's scales hold one entry per block: a rank boundary inside a block would leave a
    # rank with a partial block, and the scales, split alike, would no longer line up with it.
    weight_name = tensor.name[:-len(SCALE_SUFFIX)] if tensor.name.endswith("weight" + SCALE_SUFFIX) else tensor.name
    weight = catalog.tensors.get(weight_name)
    if mp > 1 and weight_name + SCALE_SUFFIX in catalog.tensors and weight_name + SCALE_SUFFIX not in dequantized \
            and weight is not None \
            and weight.dtype in _FP8_DTYPES and len(weight.shape) == 2 and dim < 2:
        part, rest = divmod(weight.shape[dim], mp)
        if rest == 0 and part % block[dim]:
            raise LayoutError(f"tensor {tensor.name} ({ds_name}): each of the {mp} parts of {weight_name} along dim "
                              f"{dim} holds {part} of {weight.shape[dim]}, not a multiple of the {block[dim]}-wide fp8 "
                              f"scale blocks, so {weight_name + SCALE_SUFFIX} cannot be split with it; "
                              f"convert with dtype bf16 to dequantize instead")
    shape = tensor.shape
    if dim >= len(shape):
        raise LayoutError(f"tensor {tensor.name} ({ds_name}): splits along dim {dim}, but has shape {list(shape)}")
    if shape[dim] % mp:
        raise LayoutError(f"tensor {tensor.name} ({ds_name}): dim {dim} of size {shape[dim]} does not divide "
                          f"into {mp} model-parallel parts")


def _layer_index(hf_name: str) -> int | None:
    m = _LAYER.match(hf_name)
    return int(m.group(1)) if m else None


def _refuse_uncovered_family(catalog: Catalog) -> None:
    """convert.py maps names, whatever the model; a family pyconv knows and DeepSeek's layout does
    not cover is refused by name (a source of unknown architecture is converted by names alone)."""
    from pyconv.families import families_with, family_for_architecture

    try:
        family = family_for_architecture(catalog.architecture, catalog.path)
    except FormatError:
        return
    if not family.deepseek_inference:
        covered = ", ".join(f.name for f in families_with(lambda f: f.deepseek_inference))
        raise LayoutError(f"{catalog.path}: DeepSeek's inference layout holds DeepSeek models ({covered}), not "
                          f"{catalog.architecture} (the {family.name} family)")


def plan_output(catalog: Catalog, target: TargetSpec) -> list[PlannedFile]:
    from pyconv.layout.rules import ExpertPartition
    from pyconv.families import kept_dtypes

    _refuse_uncovered_family(catalog)
    mp = target.options.tp
    if mp < 1:
        raise LayoutError(f"tp must be a positive integer, got {mp}")
    if not isinstance(catalog.config, dict):
        raise LayoutError(f"{catalog.path}: the deepseek layout needs the model's config.json "
                          f"(num_hidden_layers, n_routed_experts), and the source has none")
    layers = _config_int(catalog.config, "num_hidden_layers", True)
    experts = _config_int(catalog.config, "n_routed_experts", False)
    if experts is not None and experts % mp:
        raise LayoutError(f"n_routed_experts {experts} does not divide into {mp} model-parallel ranks")
    partition = ExpertPartition(experts or 0, mp)
    block = _fp8_block(catalog.config)

    ranks: list[list[_RankTensor]] = [[] for _ in range(mp)]
    origin: dict[str, str] = {}  # DeepSeek name -> the Hugging Face tensor it came from
    if target.dtype in _FP8_DTYPES:
        raise LayoutError("the deepseek layout keeps the source's fp8 weights as they are; quantize with "
                          "to hf with dtype fp8 first")
    dtypes = output_dtypes(catalog.tensors, target.dtype, kept_dtypes(catalog) if target.dtype else frozenset())
    # A dequantized fp8 weight no longer needs its scales (and they need not split with it).
    dequantized = {n + SCALE_SUFFIX for n, t in catalog.tensors.items()
                   if t.dtype in _FP8_DTYPES and dtypes[n] != t.dtype}
    dropped_mtp = 0
    for hf_name, tensor in catalog.tensors.items():
        layer = _layer_index(hf_name)
        if layer is not None and layer >= layers:
            dropped_mtp += 1  # multi-token-prediction layers: not the inference model
            continue
        if hf_name in dequantized:
            continue  # scales of dequantized weights
        ds_name, key = deepseek_name(hf_name)
        if ds_name in origin:
            raise LayoutError(f"tensors {origin[ds_name]} and {hf_name} both become {ds_name}")
        origin[ds_name] = hf_name
        dtype = dtypes[hf_name]
        dim = MAPPING[key][1]
        if _routed_expert(ds_name) or dim is None:
            rows, cols = view2d(tensor.shape)
            whole = tuple(copies_for_region(tensor, 0, 0, rows, cols, dtype=dtype)) if rows * cols else ()
        if _routed_expert(ds_name):
            index = _expert_index(ds_name)
            if index is None:
                raise LayoutError(f"tensor {hf_name} ({ds_name}): routed expert without an expert index")
            if experts is None:
                raise LayoutError(f"tensor {hf_name}: a routed expert, but config.json has no n_routed_experts")
            if index >= experts:
                raise LayoutError(f"tensor {hf_name}: expert {index} is outside n_routed_experts {experts}")
            ranks[partition.rank_of(index)].append(_RankTensor(ds_name, dtype, tensor.shape, whole))
        elif dim is None:
            for rank in ranks:
                rank.append(_RankTensor(ds_name, dtype, tensor.shape, whole))
        else:
            _check_split(catalog, tensor, ds_name, dim, mp, block, dequantized)
            shape = tensor.shape[:dim] + (tensor.shape[dim] // mp,) + tensor.shape[dim + 1:]
            for i, rank in enumerate(ranks):
                rank.append(_RankTensor(ds_name, dtype, shape, part_copies(tensor, dim, mp, i, dtype)))

    files = PlannedFiles()
    for i, rank in enumerate(ranks):
        header, entries = layout_like_save_file([(t.name, t.dtype, t.shape) for t in rank])
        by_name = {t.name: t for t in rank}
        tensors = tuple(PlannedTensor(name, dtype, shape, len(header) + begin, by_name[name].copies)
                        for name, dtype, shape, begin, _ in entries)
        size = len(header) + (entries[-1][4] if entries else 0)
        files.append(PlannedFile(file_name(i, mp), size, tensors, ((0, header),)))
    for path, size in catalog.extra_files:
        base = os.path.basename(path)
        if fnmatch.fnmatchcase(base, _TOKENIZER_GLOB) and not base.startswith("."):  # as glob("*token*")
            files.append(plan_file_copy(path, size, base))
    # Beside convert.py's files (which stay byte-identical), the config pyconv reads them back with.
    config = updated_config(catalog.config, target.dtype, False, any(d in _FP8_DTYPES for d in dtypes.values()))
    if dropped_mtp:
        config["num_nextn_predict_layers"] = 0
        files.notes = (f"{dropped_mtp} tensors of the multi-token-prediction layers (layers >= num_hidden_layers = "
                       f"{layers}) dropped, as DeepSeek's convert.py drops them",)
    files.append(plan_text_file(CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n"))
    return files


# ---- reader ----------------------------------------------------------------------------------

def _rank_files(root: str) -> list[tuple[int, int, str]]:
    """(rank, mp, file name) of the files named model{i}-mp{N}.safetensors exactly."""
    try:
        entries = os.listdir(root)
    except OSError:
        return []
    out = []
    for entry in entries:
        m = _FILE_NAME.match(entry)
        if m and entry == file_name(int(m.group(1)), int(m.group(2))):
            out.append((int(m.group(1)), int(m.group(2)), entry))
    return sorted(out)


def detect(path: str) -> bool:
    return os.path.isdir(path) and bool(_rank_files(path))


def read(path: str) -> Catalog:
    root = os.path.abspath(path)
    found = _rank_files(root)
    mps = sorted({mp for _, mp, _ in found})
    if not mps:
        raise FormatError(f"{root}: no model{{i}}-mp{{N}}.safetensors files")
    if len(mps) > 1:
        raise FormatError(f"{root}: files of several model-parallel sizes ({', '.join(f'mp{n}' for n in mps)})")
    mp = mps[0]
    names = {rank: name for rank, _, name in found}
    beyond = [rank for rank in names if rank >= mp]
    if beyond:
        raise FormatError(f"{os.path.join(root, names[beyond[0]])}: rank {beyond[0]} is beyond the {mp} ranks")
    missing = [i for i in range(mp) if i not in names]
    if missing:
        raise FormatError(f"{root}: {file_name(missing[0], mp)} is missing")
    stray = sorted(e for e in os.listdir(root) if e.endswith(".safetensors") and e not in names.values())
    if stray:
        raise FormatError(f"{root}: {stray[0]} is not one of the model{{i}}-mp{mp}.safetensors files")
    config_path = os.path.join(root, CONFIG)
    if not os.path.isfile(config_path):
        raise FormatError(f"{root}: a DeepSeek inference directory holds no config.json, but pyconv needs the "
                          f"model's config.json to name the architecture: copy the Hugging Face config.json into it")
    config = load_config(config_path)
    architecture = config_architecture(config)

    # DeepSeek name -> [(rank, stored)] in rank order, first-seen order across the files.
    held: dict[str, list[tuple[int, StoredTensor]]] = {}
    for rank in range(mp):
        rank_path = os.path.join(root, names[rank])
        stored = read_safetensors(rank_path).tensors
        for name, st in sorted(stored.items(), key=lambda kv: kv[1].offset):
            held.setdefault(name, []).append((rank, st))

    hf_names = {ds_name: hf_name_for(ds_name, pieces[0][1].path) for ds_name, pieces in held.items()}
    tensors: dict[str, CanonicalTensor] = {}
    for ds_name, pieces in held.items():
        hf_name, key = hf_names[ds_name]
        if _routed_expert(ds_name):
            if len(pieces) != 1:
                raise FormatError(f"{root}: routed expert tensor '{ds_name}' is stored in "
                                  f"{len(pieces)} rank files, not one")
            tensors[hf_name] = CanonicalTensor.whole(hf_name, pieces[0][1])
            continue
        if len(pieces) != mp:
            absent = next(i for i in range(mp) if i not in {r for r, _ in pieces})
            raise FormatError(f"{os.path.join(root, file_name(absent, mp))}: tensor '{ds_name}' is missing "
                              f"(every rank holds it or its part)")
        first = pieces[0][1]
        for rank, st in pieces[1:]:
            if st.dtype != first.dtype or st.shape != first.shape:
                raise FormatError(f"{st.path}: tensor '{ds_name}' is {st.dtype} {list(st.shape)}, but "
                                  f"{first.dtype} {list(first.shape)} in {os.path.basename(first.path)}")
        dim = MAPPING[key][1]
        if dim is None:
            tensors[hf_name] = CanonicalTensor.whole(hf_name, first)
            continue
        if dim >= len(first.shape):
            raise FormatError(f"{first.path}: tensor '{ds_name}' has shape {list(first.shape)}, "
                              f"but is split along dim {dim}")
        shape = first.shape[:dim] + (first.shape[dim] * mp,) + first.shape[dim + 1:]
        blocks = []
        if math.prod(shape):
            for rank, st in pieces:
                blocks += part_blocks(st, dim, rank, shape)
        tensors[hf_name] = CanonicalTensor(hf_name, first.dtype, shape, tuple(blocks))
    return Catalog("deepseek", root, tensors, config, architecture, extra_files(root), details={"tp": mp})
