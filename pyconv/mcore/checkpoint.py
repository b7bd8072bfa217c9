"""Megatron-LM's checkpoint directory conventions: the tracker file naming the iteration, the
iteration directories, the rank file name and version, and the args each rank file carries."""

from __future__ import annotations

import os
from argparse import Namespace

from pyconv.errors import FormatError

TRACKER = "latest_checkpointed_iteration.txt"
CHECKPOINT_FILE = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0


def iteration_dir(path: str) -> tuple[str, str]:
    """(directory holding the mp_rank_* dirs, iteration label)."""
    tracker = os.path.join(path, TRACKER)
    if os.path.isfile(tracker):
        with open(tracker, "rb") as f:
            text = f.read(64).decode("utf-8", "replace").strip()
        if text == "release":
            directory = os.path.join(path, "release")
        elif text.isdigit():
            directory = os.path.join(path, f"iter_{int(text):07d}")
        else:
            raise FormatError(f"{tracker}: expected 'release' or an iteration number, found {text[:40]!r}")
        if not os.path.isdir(directory):
            raise FormatError(f"{tracker}: names iteration '{text}' but {directory} does not exist")
        return directory, text
    return path, os.path.basename(os.path.normpath(path))


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
                 "pipeline_model_parallel_layout", "qk_layernorm", "num_experts", "mtp_num_layers")
