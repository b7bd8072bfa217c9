"""Megatron-LM's checkpoint directory conventions: the tracker file naming the iteration, the
iteration directories, the rank file name and version, and the args each rank file carries."""

from __future__ import annotations

import os
import re
from argparse import Namespace
from dataclasses import dataclass

from pyconv.errors import FormatError

TRACKER = "latest_checkpointed_iteration.txt"
# A Megatron-Core distributed (torch_dist) checkpoint directory: PyTorch DCP's metadata file
# (pyconv.io.dcp reads it), Megatron's metadata.json and common.pt. Here, not in pyconv.mcore.dcp,
# so that format detection does not import the DCP reader and writer.
DCP_METADATA_FILE = ".metadata"
BACKEND_FILE = "metadata.json"
COMMON_FILE = "common.pt"
CONTENT_METADATA = "content_metadata"  # common.pt's record of the sharded_state_dict metadata
SINGLETON_FLAG = "singleton_local_shards"
CHECKPOINT_FILE = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0
# A run with the distributed optimizer (Megatron-LM before mid-2023, and transformers' scripts
# after it) saves the model as model_rng.pt and the optimizer per data-parallel rank as
# mp_rank_TT[_PPP]_DDD/optim.pt: a directory named like a rank that holds no model. Newer
# Megatron-LM writes distrib_optim.pt beside model_optim_rng.pt.
RANK_FILES = (CHECKPOINT_FILE, "model_rng.pt")
OPTIMIZER_FILES = ("distrib_optim.pt", "optim.pt")
OPTIMIZER_ENTRIES = ("optimizer", "opt_param_scheduler")  # of a rank file: training state, not weights
RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")
_ITERATION_DIR = re.compile(r"^iter_(\d{7,})$")
_TRACKER_LIMIT = 64  # "release" or an iteration number, and a newline


@dataclass(frozen=True)
class RankFiles:
    """The rank files of one iteration directory, by the numbers of their mp_rank_* directory,
    and the optimizer files found beside or apart from them (read by nothing)."""

    ranks: dict[tuple[int, ...], str]
    optimizer_files: tuple[str, ...]


def find_rank_files(directory: str) -> RankFiles:
    """Every mp_rank_TT[_NNN[_NNN]] directory holding a model file is a rank; one holding only
    optimizer files is the distributed optimizer's; one holding neither is an error."""
    ranks, optimizer_files = {}, []
    for entry in sorted(os.listdir(directory)):
        m = RANK_DIR.match(entry)
        rank_dir = os.path.join(directory, entry)
        if not m or not os.path.isdir(rank_dir):
            continue
        present = [n for n in RANK_FILES + OPTIMIZER_FILES if os.path.isfile(os.path.join(rank_dir, n))]
        optimizer_files += [os.path.join(rank_dir, n) for n in present if n in OPTIMIZER_FILES]
        model = next((n for n in present if n in RANK_FILES), None)
        if model is not None:
            ranks[tuple(int(g) for g in m.groups() if g is not None)] = os.path.join(rank_dir, model)
        elif not present:
            raise FormatError(f"{rank_dir}: no {' or '.join(RANK_FILES)} (nor an optimizer file: "
                              f"{', '.join(OPTIMIZER_FILES)})")
    if not ranks:
        found = f" (only optimizer files: {', '.join(sorted({os.path.basename(f) for f in optimizer_files}))})" \
            if optimizer_files else ""
        raise FormatError(f"{directory}: no mp_rank_* directory holding {' or '.join(RANK_FILES)}{found}")
    styles = {}
    for numbers, file in ranks.items():  # Megatron-LM names every rank of a run the same way
        styles.setdefault(len(numbers), os.path.basename(os.path.dirname(file)))
    if len(styles) > 1:
        raise FormatError(f"{directory}: rank directories named two ways ({' and '.join(styles.values())}), which "
                          "cannot both belong to one checkpoint: remove the stray ones")
    return RankFiles(ranks, tuple(optimizer_files))


def skipped_training_state(optimizer_files, rank_objects) -> str | None:
    """The plan note saying which training state a reader left behind, or None."""
    entries = sorted({k for obj in rank_objects for k in OPTIMIZER_ENTRIES if isinstance(obj, dict) and k in obj})
    parts = []
    if entries:
        parts.append(" and ".join(f"'{k}'" for k in entries) + " in the rank files")
    if optimizer_files:
        names = sorted({os.path.basename(f) for f in optimizer_files})
        parts.append(f"{len(optimizer_files)} optimizer file{'s' if len(optimizer_files) > 1 else ''} "
                     f"({', '.join(names)})")
    return f"optimizer state not converted (weights only): {'; '.join(parts)}" if parts else None


def is_dcp_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, DCP_METADATA_FILE)) or os.path.isfile(os.path.join(path, BACKEND_FILE))


def iteration_dir(path: str) -> tuple[str, str]:
    """(directory holding the mp_rank_* dirs, iteration label)."""
    tracker = os.path.join(path, TRACKER)
    if os.path.isfile(tracker):
        with open(tracker, "rb") as f:
            raw = f.read(_TRACKER_LIMIT + 1)
        text = raw.decode("utf-8", "replace").strip()
        if text == "release":
            directory = os.path.join(path, "release")
        elif len(raw) <= _TRACKER_LIMIT and text.isascii() and text.isdigit():
            directory = os.path.join(path, f"iter_{int(text):07d}")
        else:
            raise FormatError(f"{tracker}: expected 'release' or an iteration number, found {text[:40]!r}"
                              + (f" and more (over {_TRACKER_LIMIT} bytes)" if len(raw) > _TRACKER_LIMIT else ""))
        if not os.path.isdir(directory):
            raise FormatError(f"{tracker}: names iteration '{text}' but {directory} does not exist")
        return directory, text
    iterations = iteration_dirs(path)
    if iterations and not any(RANK_DIR.match(e) for e in os.listdir(path)):
        if len(iterations) > 1:
            raise FormatError(f"{path}: no {TRACKER} to say which of {', '.join(iterations)} to read; convert one "
                              f"of them (e.g. {os.path.join(path, iterations[-1])})")
        only = iterations[0]
        return os.path.join(path, only), only if only == "release" else str(int(only.removeprefix("iter_")))
    return path, os.path.basename(os.path.normpath(path))


def iteration_dirs(path: str) -> list[str]:
    """The release/ and iter_NNNNNNN/ directories directly under path, in order."""
    return sorted(e for e in os.listdir(path) if (_ITERATION_DIR.match(e) or e == "release")
                  and os.path.isdir(os.path.join(path, e)))


def args_dict(args, where: str) -> dict:
    if isinstance(args, Namespace):
        args = vars(args)
    if not isinstance(args, dict):
        raise FormatError(f"{where}: 'args' is missing or not an argparse.Namespace")
    from pyconv.io.unpickle import TorchDtype

    return {k: (v.name if isinstance(v, TorchDtype) else v) for k, v in args.items()}


ARGS_SUMMARY = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                 "kv_channels", "normalization", "swiglu", "position_embedding_type", "padded_vocab_size",
                 "vocab_size", "untie_embeddings_and_output_weights", "params_dtype",
                 "tensor_model_parallel_size", "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size",
                 "pipeline_model_parallel_layout", "qk_layernorm", "num_experts", "mtp_num_layers",
                 "use_rope_scaling", "rope_scaling_factor", "rotary_seq_len_interpolation_factor", "rotary_percent",
                 "no_rope_freq", "add_qkv_bias", "add_bias_linear", "gated_linear_unit", "openai_gelu",
                 "apply_layernorm_1p", "softmax_scale", "window_size", "window_attn_skip_freq", "rotary_base",
                 "rotary_base_local", "attn_logit_softcapping", "final_logit_softcapping", "post_layernorm",
                 "qk_layernorm_whole_projection")


OPTIMIZER_KEY_PREFIX = "optimizer."  # a distributed checkpoint's optimizer state (Megatron-LM, NeMo)


def skipped_optimizer_keys(keys) -> str | None:
    """The plan note for the optimizer tensors of a distributed checkpoint, or None."""
    count = sum(1 for k in keys if k.startswith(OPTIMIZER_KEY_PREFIX))
    if not count:
        return None
    return (f"optimizer state not converted (weights only): {count} '{OPTIMIZER_KEY_PREFIX}*' tensor"
            f"{'s' if count > 1 else ''} of the distributed checkpoint")

