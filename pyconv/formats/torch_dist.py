"""Megatron-Core distributed checkpoints (`--ckpt-format torch_dist`).

    DIR/latest_checkpointed_iteration.txt     optional: "release" or N (Megatron-LM's layout)
    DIR/release/ or DIR/iter_0000NNN/ or DIR itself:
        metadata.json   {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                         "common_backend": "torch", "common_backend_version": 1}
        common.pt       torch.save of the non-sharded state: Megatron-LM puts `args`,
                        `checkpoint_version` and `iteration` there; a bare
                        `dist_checkpointing.save(model.sharded_state_dict())` leaves it {}
        .metadata       PyTorch DCP metadata (pyconv.io.dcp)
        __R_N.distcp    data files; every tensor chunk a torch.save archive

Each key is a global tensor whatever the parallelism it was saved with: the Megatron-Core
tensor at TP=1 (fused QKV interleaved per query group, linear_fc1 = [gate; up], the vocabulary
padded), the decoder layers stacked on a leading axis (`decoder.layers.self_attention.
linear_qkv.weight [L, (heads + 2 * groups) * head_dim, hidden]`), norms under TransformerEngine
names (`...linear_qkv.layer_norm_weight`) even for the local spec. A chunk is whatever block a
rank saved: one layer's rows of one TP rank, the gate or the up half of fc1 of a TP rank... The
reader describes the TP=1 tensor of each mapping with the family table's shard pieces at tp=1
and clips every chunk against them, so chunks may cut layers, rows and columns anywhere.

Mixture-of-experts layers add an expert axis after the layer axis: Megatron-Core 0.16's
SequentialMLP, GroupedMLP and TEGroupedMLP all save the routed experts under one key,
`decoder.layers.mlp.experts.experts.linear_fc1.weight [L, E, 2 * moe_ffn, hidden]` (each
expert's fc1 [gate; up], cut by TP like a dense fc1) and `...experts.linear_fc2.weight
[L, E, hidden, moe_ffn]`, their extra state as `..._extra_state/shard_{l}.{e}_{L}.{E}`; the
router and the shared expert are ordinary layer keys (`decoder.layers.mlp.router.weight
[L, E, hidden]`, `decoder.layers.mlp.shared_experts.linear_fc1.weight`). When the layers
differ (DeepSeek-V3's dense first layers, or `non_homogeneous_layers`), Megatron-Core gives every
layer its own keys instead (`decoder.layers.3.mlp.experts.experts.linear_fc1.weight [E, 2F, H]`,
extra state `..._extra_state/shard_0_1`, experts `shard_{e}_{E}`); both are read, and the writer
uses per-layer keys exactly when the family's layers differ.

Megatron-Core >= 0.14 has a second layout, saved with `sharded_state_dict(metadata=
{'singleton_local_shards': True})` and recorded as `content_metadata` in common.pt (where
Megatron-LM and NeMo take the metadata they load with from): per-layer keys always, a gated fc1
as two keys `decoder.layers.3.mlp.linear_fc1.weight_w` (gate) and `..._v` (up), [F, H] each cut by
TP on its own, and every routed expert under its own keys with no expert axis
(`decoder.layers.3.mlp.experts.experts.5.linear_fc1.weight_w [F_moe, H]`, extra state
`...experts.5.linear_fc1._extra_state/shard_0_1`). The reader tells the layouts apart by the keys,
joins such keys back into the per-layer keys above (join_singleton_keys), and refuses a
checkpoint that mixes the two or whose content_metadata names the other. The writer writes the
default layout and records `content_metadata = {'singleton_local_shards': False}` as Megatron-LM
does.

The model's dims come from a Hugging Face config.json placed in the checkpoint directory (or its
iteration directory) when there is one, else from common.pt's Megatron args (Megatron-LM and
pyconv write them): the shapes alone cannot tell heads from head_dim. Optimizer state
(`optimizer.*`) and bytes items (extra state, RNG state) are not weights and are skipped; every
other key must map.
"""

from __future__ import annotations

from dataclasses import dataclass

import json
import os
from argparse import Namespace
from typing import TYPE_CHECKING

from pyconv.catalog import Catalog
from pyconv.dtypes import FLOAT_DTYPES, TORCH_NAME, model_dtype
from pyconv.errors import FormatError
from pyconv.io.jsonfile import config_architecture, load_config
from pyconv.mcore.checkpoint import (
    ARGS_SUMMARY,
    BACKEND_FILE,
    CHECKPOINT_VERSION,
    COMMON_FILE,
    CONTENT_METADATA,
    DCP_METADATA_FILE,
    OPTIMIZER_KEY_PREFIX,
    SINGLETON_FLAG,
    TRACKER,
    args_dict,
    is_dcp_dir,
    iteration_dir,
    iteration_dirs,
    skipped_optimizer_keys,
)
from pyconv.mcore.options import DcpOptions
from pyconv.plan import PlannedFile, TargetSpec, plan_file_copy, plan_text_file

if TYPE_CHECKING:  # detection runs on every source: the family tables and the DCP code load when used
    from pyconv.families import Family, ModelDims

CONFIG = "config.json"
_DCP_SUFFIX = ".distcp"

READ_OPTIONS = ("family",)  # read(path, family=...): the family of a checkpoint whose args do not tell it


# ---- where the checkpoint is -------------------------------------------------------------------


@dataclass(frozen=True)
class Options(DcpOptions):
    tp: int = 1                   # sets the vocabulary padding only: the tensors are global
    iteration: int | None = None  # None: release/
    vocab_divisible_by: int = 128  # Megatron's make_vocab_size_divisible_by



def _checkpoint_dir(root: str) -> tuple[str, str | None]:
    """(directory holding .metadata, iteration label or None)."""
    if is_dcp_dir(root):
        return root, None
    directory, iteration = iteration_dir(root)
    if not is_dcp_dir(directory):
        raise FormatError(f"{directory}: no {DCP_METADATA_FILE} or {BACKEND_FILE}: not a torch_dist checkpoint")
    return directory, iteration


def detect(path: str) -> bool:
    if not os.path.isdir(path):
        return False
    if is_dcp_dir(path):
        return True
    if not os.path.isfile(os.path.join(path, TRACKER)):
        # iterations without the tracker: reading says which to choose
        return any(is_dcp_dir(os.path.join(path, d)) for d in iteration_dirs(path))
    try:
        return is_dcp_dir(iteration_dir(os.path.abspath(path))[0])
    except FormatError:
        return False


def _common_state(directory: str) -> dict | None:
    """common.pt's dict; None without one."""
    path = os.path.join(directory, COMMON_FILE)
    if not os.path.isfile(path):
        return None
    from pyconv.io.torchzip import read_torch_checkpoint

    common = read_torch_checkpoint(path).obj
    if not isinstance(common, dict):
        raise FormatError(f"{path}: common state is not a dict")
    return common


def _common_args(common: dict | None, path: str) -> dict | None:
    """Megatron-LM's args from common.pt, as a dict with dtypes by name; None without any."""
    if common is None or common.get("args") is None:
        return None
    return args_dict(common["args"], path)


def _content_metadata(common: dict | None, path: str) -> dict | None:
    """The sharded_state_dict metadata the checkpoint was saved with, as Megatron-Core's
    `save(..., content_metadata=...)` records it in common.pt; None without any."""
    content = None if common is None else common.get(CONTENT_METADATA)
    if content is not None and not isinstance(content, dict):
        raise FormatError(f"{path}: '{CONTENT_METADATA}' is a {type(content).__name__}, not a dict")
    if content is not None and not isinstance(content.get(SINGLETON_FLAG, False), bool):
        raise FormatError(f"{path}: '{CONTENT_METADATA}' has {SINGLETON_FLAG}="
                          f"{str(content[SINGLETON_FLAG])[:40]!r}, not a bool")
    return content


# ---- the model: family, dims, HF config ---------------------------------------------------------

def _model(root: str, directory: str, args: dict | None, family: str | None,
           common_problem: str | None = None) -> tuple[Family, ModelDims, dict, str]:
    """(family, dims, HF config, where they came from). A config.json placed beside the
    checkpoint wins: it is the user's word on the HF model (true vocabulary, token ids, RoPE
    scaling), which Megatron-LM's args may not carry. Without one, common.pt's args. A common.pt
    that cannot be read (a global outside pyconv's allowlist) is no obstacle when a config.json
    says what the model is."""
    from pyconv.families import family_for_architecture, get_family

    for candidate in dict.fromkeys((os.path.join(directory, CONFIG), os.path.join(root, CONFIG))):
        if os.path.isfile(candidate):
            config = load_config(candidate)
            fam = get_family(family) if family else family_for_architecture(config_architecture(config), candidate)
            return fam, fam.dims_from_hf(config), dict(config), CONFIG
    if args is not None:
        from pyconv.mcore.config import family_from_args, megatron_dims

        where = os.path.join(directory, COMMON_FILE)
        fam = get_family(family) if family else family_from_args(args, where)
        return fam, megatron_dims(args, where), fam.hf_config_from_megatron(args), "common.pt args"
    if common_problem:
        raise FormatError(f"{common_problem} (put the model's Hugging Face {CONFIG} in {root} to read the weights "
                          "without it)")
    raise FormatError(f"{directory}: {COMMON_FILE} holds no Megatron args, so the model's dims are unknown: put the "
                      f"model's Hugging Face {CONFIG} in {root}")


# ---- reading -----------------------------------------------------------------------------------

def read(path: str, family: str | None = None) -> Catalog:
    from pyconv.io.dcp import read_metadata
    from pyconv.mcore.dcp import check_backend, is_singleton_key, padded_vocab, read_tensors, with_mtp_layers

    root = os.path.abspath(path)
    directory, iteration = _checkpoint_dir(root)
    check_backend(directory)
    md = read_metadata(directory)
    common_path = os.path.join(directory, COMMON_FILE)
    try:
        common = _common_state(directory)
        args, common_problem = _common_args(common, common_path), None
    except FormatError as e:
        common, args, common_problem = None, None, str(e)
    content = _content_metadata(common, common_path)
    fam, dims, config, config_source = _model(root, directory, args, family, common_problem)
    keys = {k: k for k in md.tensors if not k.startswith(OPTIMIZER_KEY_PREFIX)}
    dims = with_mtp_layers(fam, dims, keys)
    if dims.mtp_layers:
        config["num_nextn_predict_layers"] = dims.mtp_layers
    padded = padded_vocab(fam, dims, md, directory, keys)
    tensors = read_tensors(md, directory, fam, dims, padded, keys, content)
    dtype = next((t.dtype for t in tensors.values()), None)
    if dtype in FLOAT_DTYPES:
        config["dtype"] = TORCH_NAME[dtype]
    details = {"family": fam.name, "padded_vocab_size": padded, "dcp_version": md.version,
               "chunks": sum(len(t.chunks) for t in md.tensors.values()), "config_from": config_source,
               "sharded_layout": SINGLETON_FLAG if any(map(is_singleton_key, keys))
               or (content or {}).get(SINGLETON_FLAG) else "default"}
    if content is not None:
        details[CONTENT_METADATA] = {k: v for k, v in sorted(content.items(), key=lambda kv: str(kv[0]))
                                     if isinstance(k, str) and isinstance(v, (str, bool, int, float))}
    if iteration is not None:
        details["iteration"] = iteration
    if common_problem:
        details["common.pt"] = f"not read: {common_problem}"
    if args is not None:
        details["args"] = {k: args[k] for k in sorted(args) if k in ARGS_SUMMARY}
    note = skipped_optimizer_keys(md.tensors)
    return Catalog("torch_dist", root, tensors, config, fam.architectures[0], _extra_files(root, directory),
                   details=details, notes=(note,) if note else ())


# ---- Megatron-Core's singleton_local_shards layout ----------------------------------------------


def _extra_files(root: str, directory: str) -> tuple[tuple[str, int], ...]:
    """Tokenizer and other small files beside the checkpoint, never its own files."""
    own = {TRACKER, BACKEND_FILE, COMMON_FILE, CONFIG}
    extra: dict[str, tuple[str, int]] = {}
    for folder in dict.fromkeys((root, directory)):
        for name in sorted(os.listdir(folder)):
            file = os.path.join(folder, name)
            if (name in own or name in extra or name.startswith(".") or name.endswith(_DCP_SUFFIX)
                    or not os.path.isfile(file) or os.path.islink(file)):
                continue
            extra[name] = (file, os.path.getsize(file))
    return tuple(extra.values())


# ---- writing -----------------------------------------------------------------------------------


def plan_output(catalog: Catalog, target: TargetSpec) -> list[PlannedFile]:
    """A Megatron-LM-style torch_dist checkpoint: the tracker file and `release/` (or
    `iter_NNNNNNN/`) with metadata.json, common.pt (Megatron args, so that pyconv and Megatron-LM
    read the model back), .metadata and the data files. Every key is written as Megatron-Core
    saves it at TP=1: one chunk per layer (per layer and expert), a torch.save archive each.
    `--tp` only sets the vocabulary padding (to a multiple of make_vocab_size_divisible_by * tp,
    as Megatron pads for that TP); the global tensors are the same for any TP and EP. Keys are
    TransformerEngine-style: Megatron-Core's local spec saves and loads the same keys, except a
    mixture-of-experts layer's pre-MLP norm, which follows --megatron-naming (see dist_key)."""
    from pyconv.io.torchsave import TorchDtypeValue
    from pyconv.layout import padded_vocab_size
    from pyconv.mcore.config import attention_notes, check_tensor_parallel, family_and_dims
    from pyconv.mcore.dcp import plan_dcp
    from pyconv.plan import PlannedFiles

    family, dims = family_and_dims(catalog, with_mtp=True)
    check_tensor_parallel(dims, target.options.tp, family)  # the vocabulary is padded for a tp Megatron-Core can use
    config = catalog.config
    padded = padded_vocab_size(dims.vocab, target.options.vocab_divisible_by, target.options.tp)
    iteration_dir = "release" if target.options.iteration is None else f"iter_{target.options.iteration:07d}"
    params_dtype = model_dtype(target.dtype, (t.dtype for t in catalog.tensors.values()))
    args = {
        **family.megatron_args_from_hf(config, dims),
        "tensor_model_parallel_size": target.options.tp, "pipeline_model_parallel_size": 1,
        "padded_vocab_size": padded, "make_vocab_size_divisible_by": target.options.vocab_divisible_by,
        "params_dtype": TorchDtypeValue(TORCH_NAME[params_dtype]),
        "bf16": params_dtype == "BF16", "fp16": params_dtype == "F16",
        "ckpt_format": "torch_dist", "iteration": target.options.iteration or 0,
        "pyconv_hf_config": json.dumps(config, sort_keys=True),
    }
    common = {"args": Namespace(**args), "checkpoint_version": CHECKPOINT_VERSION, "iteration": target.options.iteration or 0}
    files = PlannedFiles(plan_dcp(catalog, target, family, dims, padded, iteration_dir, common))
    files.notes = attention_notes(config, args)
    files.append(plan_text_file(TRACKER, "release" if target.options.iteration is None else str(target.options.iteration)))
    for path, size in catalog.extra_files:
        files.append(plan_file_copy(path, size, os.path.basename(path)))
    return files
