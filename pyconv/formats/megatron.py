"""Megatron-LM / Megatron-Core per-rank checkpoints.

    DIR/latest_checkpointed_iteration.txt          "release" or the iteration number
    DIR/release/ or DIR/iter_0000NNN/
        mp_rank_TT/model_optim_rng.pt              pp = 1
        mp_rank_TT_PPP/model_optim_rng.pt          pp > 1
            {"args": argparse.Namespace, "checkpoint_version": 3.0, "iteration": N, "model": {name: tensor}}
            an interleaved (virtual) pipeline has "model0".."model{V-1}" instead of "model": chunk v
            of pipeline rank p holds model chunk k = v * pp + p (pyconv.layout.virtual_stages)

Every shard tensor is described by the Pieces of its family mapping's shard rule
(pyconv.layout): the writer fills each shard from the canonical tensors with them, the reader
turns each shard back into blocks of the canonical tensors with the same pieces.
"""

from __future__ import annotations

import json
import os
import re
from argparse import Namespace
from collections import OrderedDict
from dataclasses import dataclass, replace

from pyconv.dtypes import FLOAT_DTYPES, TORCH_NAME, output_dtype
from pyconv.fp8 import scale_names
from pyconv.catalog import CanonicalTensor, Catalog, SourceBlock, StoredTensor, view2d
from pyconv.errors import FormatError, LayoutError
from pyconv.families import (
    FIRST_STAGE, LAST_STAGE, LAYER, Family, ModelDims,
    TensorMapping, family_for_architecture, family_for_megatron_args, get_family,
)
from pyconv.formats import register_format
from pyconv.io.torchsave import TensorSlot, TorchDtypeValue, layout_torch_save
from pyconv.layout import (
    Piece, layout_mtp_chunk, layout_stages, padded_vocab_size, slot_stages, virtual_stages,
)
from pyconv.plan import BlockCopy, PlannedFile, PlannedTensor, TargetSpec, plan_file_copy, \
    plan_text_file

TRACKER = "latest_checkpointed_iteration.txt"
CHECKPOINT_FILE = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")


# ---- the layout of one mapping on one rank -------------------------------------------------

def logical_shape(shape: tuple[int, ...], transposed: bool) -> tuple[int, int]:
    """[out, in] as Megatron stores it; a vector is [n, 1]."""
    if len(shape) == 1:
        return shape[0], 1
    rows, cols = view2d(shape)
    return (cols, rows) if transposed else (rows, cols)


def shard_pieces(mapping: TensorMapping, names: list[str], dims: ModelDims, padded_vocab: int,
                 tp: int, rank: int, naming: str = "te") -> list[Piece]:
    """The pieces of the shard that TP rank `rank` holds for one mapping (names: concrete HF names).
    `naming` matters to MLA's down projections only: whole under TransformerEngine's spec,
    column-parallel under the local one."""
    shape = logical_shape(mapping.shape(dims), mapping.transposed)
    return mapping.rule.pieces(names, shape, dims, padded_vocab, tp, rank, naming)


def shard_shape(pieces: list[Piece], canonical_rank: int) -> tuple[int, ...]:
    rows = max(p.dst_row + p.rows for p in pieces)
    cols = max(p.dst_col + p.cols for p in pieces)
    return (rows,) if canonical_rank == 1 else (rows, cols)


def _fill(pattern: str, layer: int | None, expert: int | None) -> str:
    if layer is not None:
        pattern = pattern.replace("*", str(layer))
    return pattern.replace("#", str(expert)) if expert is not None else pattern


def megatron_tensor_name(mapping: TensorMapping, naming: str, local_layer: int | None,
                         local_expert: int | None = None) -> str:
    return _fill(mapping.megatron_name(naming), local_layer, local_expert)


def hf_names(mapping: TensorMapping, layer: int | None, expert: int | None = None) -> list[str]:
    return [_fill(n, layer, expert) for n in mapping.hf]


def rank_dir_name(tp_rank: int, pp_rank: int, pp: int, ep_rank: int = 0, ep: int = 1) -> str:
    """mp_rank_TT, then _PPP when pp > 1, then _EEE when ep > 1, as Megatron names them."""
    return f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp > 1 else "") + (f"_{ep_rank:03d}" if ep > 1 else "")


@dataclass(frozen=True)
class Entry:
    """One tensor of a rank file: its mapping, global/local layer and global/local expert."""

    mapping: TensorMapping
    layer: int | None
    local_layer: int | None
    expert: int | None = None
    local_expert: int | None = None
    copy: bool = False  # a second copy of a tensor another stage holds (read: checked, not used)


@dataclass(frozen=True)
class MegatronLayout:
    """What places every tensor: the family table, the model dims and the parallel sizes."""

    family: Family
    dims: ModelDims
    padded_vocab: int
    stages: list[range]     # layers per model chunk: per pipeline stage, or per virtual chunk v * pp + p
    tp: int
    pp: int
    ep: int
    etp: int | None = None  # expert tensor parallel size (None: tp)
    naming: str = "te"      # "te" or "local" (MLA down projections differ in their split)
    vpp: int = 1            # model chunks per pipeline rank (interleaved schedule)
    mtp_stage: int | None = None  # the chunk holding the MTP layers (a pipeline layout's 'm'; default: the last)

    def chunks(self, p: int) -> list[tuple[str, int]]:
        """(state dict key, index into stages) of each model chunk pipeline rank p's files hold."""
        if self.vpp == 1:
            return [("model", p)]
        return [(f"model{v}", v * self.pp + p) for v in range(self.vpp)]

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    def entries(self, stage: int, ep_rank: int):
        return _stage_entries(self.family, self.dims, stage, self.stages, ep_rank, self.ep, self.mtp_stage)

    def pieces(self, mapping: TensorMapping, names: list[str], tp_rank: int, etp_rank: int | None = None,
               naming: str | None = None) -> list[Piece]:
        """Routed experts split over the expert-TP ranks (etp_rank), the rest over the TP ranks."""
        if mapping.per_expert:
            return shard_pieces(mapping, names, self.dims, self.padded_vocab, self.expert_tp,
                                tp_rank if etp_rank is None else etp_rank)
        return shard_pieces(mapping, names, self.dims, self.padded_vocab, self.tp, tp_rank, naming or self.naming)

    def rank_files(self) -> list[tuple[int, int, int]]:
        """(TP rank, EP rank, expert-TP rank) of every file of a pipeline stage; see expert_grid."""
        return expert_grid(self.tp, self.ep, self.expert_tp)


def expert_grid(tp: int, ep: int, etp: int) -> list[tuple[int, int, int]]:
    """(TP rank, EP rank, expert-TP rank) of each rank file of one pipeline stage, as Megatron-LM
    writes them with expert tensor parallelism.

    Megatron-Core orders ranks "tp-cp-ep-dp-pp" for the dense and the expert grids alike
    (megatron/core/parallel_state.py, initialize_model_parallel: `decoder_rank_generator =
    RankGenerator(tp=tp, ep=1, dp=dp, ...)` and `expert_decoder_rank_generator =
    RankGenerator(tp=expert_tensor_parallel_size, ep=expert_model_parallel_size,
    dp=expert_data_parallel_size, ...)`, order default "tp-cp-ep-dp-pp"), so rank s of a stage
    is TP rank s % tp, expert-TP rank s % etp and EP rank (s // etp) % ep. Only ranks with
    expert-data-parallel rank 0 (s < etp * ep) save a legacy checkpoint
    (megatron/training/checkpointing.py, save_checkpoint: "if not
    torch.distributed.is_initialized() or mpu.get_expert_data_parallel_rank() == 0 ..."), each
    into get_checkpoint_name()'s mp_rank_{tensor_rank:02d}[_{pipeline_rank:03d}][_{expert_rank:03d}]
    with its dense TP shard and its (EP, expert-TP) expert shard. With etp == tp this is every
    (TP rank, EP rank) pair; with etp < tp fewer directories, e.g. tp=2, etp=1, ep=2:
    mp_rank_00_000 (experts 0..E/2-1) and mp_rank_01_001 (the others)."""
    from pyconv.layout import divide

    if etp < 1:
        raise LayoutError(f"etp must be >= 1 (got {etp})")
    if etp != tp:
        divide(tp, etp, "tp", "etp")
        if etp * ep < tp:
            raise LayoutError(f"etp={etp} x ep={ep} < tp={tp}: Megatron-LM's legacy checkpoint is saved by the "
                              f"etp*ep ranks of expert-data-parallel rank 0 only, so TP ranks {etp * ep}..{tp - 1} "
                              f"of the dense weights would be in no file")
    return [(s % tp, (s // etp) % ep, s % etp) for s in range(etp * ep)]


@dataclass
class _Assembly:
    """Canonical tensors gathered while reading rank files: their blocks, dtype and order."""

    blocks: dict[str, list[SourceBlock]]
    dtypes: dict[str, str]
    order: list[str]


def experts_per_rank(dims: ModelDims, ep: int) -> int:
    if not dims.num_experts:
        return 0
    from pyconv.layout import divide

    return divide(dims.num_experts, ep, "num_experts", "ep")


def _stage_entries(family: Family, dims: ModelDims, stage: int, stages: list[range], ep_rank: int, ep: int,
                   mtp_stage: int | None = None):
    """The tensors of one (pipeline stage, expert-parallel rank) in Megatron's state-dict order:
    embeddings, layers (routed experts: those of this EP rank), final norm, multi-token-prediction
    layers (on mtp_stage, default the last) and output layer. Megatron-Core builds the embedding on
    the MTP stage too (a copy), and in a model with MTP layers puts the decoder's final norm with
    its last layer rather than on the last stage (TransformerBlock.has_final_layernorm_in_this_stage)."""
    last = stage == len(stages) - 1
    mtp_here = bool(dims.mtp_layers) and stage == (len(stages) - 1 if mtp_stage is None else mtp_stage)
    final_norm_here = (dims.num_layers - 1 in stages[stage]) if dims.mtp_layers else last
    if stage == 0 or mtp_here:
        yield from (Entry(m, None, None, copy=stage != 0) for m in family.mappings if m.where == FIRST_STAGE)
    local_count = experts_per_rank(dims, ep)
    for local, layer in enumerate(stages[stage]):
        for m in family.mappings:
            if m.where != LAYER or not m.applies_to(dims, layer):
                continue
            if m.per_expert:
                yield from (Entry(m, layer, local, ep_rank * local_count + j, j) for j in range(local_count))
            else:
                yield Entry(m, layer, local)
    tail = [m for m in family.mappings if m.where == LAST_STAGE]
    if final_norm_here:
        yield from (Entry(m, None, None) for m in tail if m.megatron_names()[0].startswith("decoder."))
    if mtp_here:
        yield from _mtp_entries(family, dims, ep_rank, local_count)
    if last:
        yield from (Entry(m, None, None) for m in tail if not m.megatron_names()[0].startswith("decoder."))


def _mtp_entries(family: Family, dims: ModelDims, ep_rank: int, local_count: int):
    """Megatron-Core's mtp.layers.i: enorm, hnorm, eh_proj, its transformer layer (HF layer
    num_layers + i), final_layernorm."""
    for i in range(dims.mtp_layers):
        layer = dims.num_layers + i
        for m in family.mtp_layer_mappings(dims):
            if m.per_expert:
                yield from (Entry(m, layer, i, ep_rank * local_count + j, j) for j in range(local_count))
            else:
                yield Entry(m, layer, i)


def mtp_hf_copies(family: Family, dims: ModelDims) -> dict[str, str]:
    """{HF name of an MTP layer's copy: the HF name of the model tensor it copies}."""
    out = {}
    for i in range(dims.mtp_layers):
        for leaf, source in family.mtp_hf_copies.items():
            if source == "lm_head.weight" and dims.tied:
                source = family.word_embedding.hf[0]
            out[f"model.layers.{dims.num_layers + i}.{leaf}"] = source
    return out


# ---- reading ---------------------------------------------------------------------------

def _iteration_dir(path: str) -> tuple[str, str]:
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


def _rank_numbers(directory: str) -> dict[tuple[int, ...], str]:
    """mp_rank_TT[_NNN[_NNN]] directories by their numbers."""
    ranks = {}
    for entry in sorted(os.listdir(directory)):
        m = _RANK_DIR.match(entry)
        if m and os.path.isdir(os.path.join(directory, entry)):
            ranks[tuple(int(g) for g in m.groups() if g is not None)] = os.path.join(directory, entry)
    return ranks


def _rank_dirs(directory: str, numbers: dict[tuple[int, ...], str], args: dict) -> dict[tuple[int, int, int], str]:
    """(tp, pp, ep) rank -> directory. Two numbers are (tp, pp) or (tp, ep), as the args say."""
    pp_from_args = args.get("pipeline_model_parallel_size") or 1
    ep_from_args = args.get("expert_model_parallel_size") or 1
    ranks = {}
    for key, path in numbers.items():
        if len(key) == 3:
            t, p, e = key
        elif len(key) == 2:
            if pp_from_args == 1 and ep_from_args > 1:
                t, p, e = key[0], 0, key[1]
            else:
                t, p, e = key[0], key[1], 0
        else:
            t, p, e = key[0], 0, 0
        ranks[(t, p, e)] = path
    return ranks


def detect(path: str) -> bool:
    if not os.path.isdir(path):
        return False
    if os.path.isfile(os.path.join(path, TRACKER)):
        return True
    return any(_RANK_DIR.match(e) for e in os.listdir(path))


def _args_dict(args, where: str) -> dict:
    if isinstance(args, Namespace):
        args = vars(args)
    if not isinstance(args, dict):
        raise FormatError(f"{where}: 'args' is missing or not an argparse.Namespace")
    from pyconv.io.unpickle import TorchDtype

    return {k: (v.name if isinstance(v, TorchDtype) else v) for k, v in args.items()}


def megatron_dims(args: dict, where: str) -> ModelDims:
    def need(key):
        if not isinstance(args.get(key), int):
            raise FormatError(f"{where}: Megatron args have no integer '{key}'")
        return args[key]

    hidden, heads = need("hidden_size"), need("num_attention_heads")
    groups = args.get("num_query_groups") if args.get("group_query_attention") else heads
    vocab = args.get("vocab_size") or args.get("padded_vocab_size")
    if not isinstance(vocab, int):
        raise FormatError(f"{where}: Megatron args have neither 'vocab_size' nor 'padded_vocab_size'")
    return ModelDims(
        num_layers=need("num_layers"), hidden=hidden, heads=heads, groups=groups or heads,
        head_dim=args.get("kv_channels") or hidden // heads, ffn=args.get("ffn_hidden_size") or 4 * hidden,
        vocab=vocab, max_positions=args.get("max_position_embeddings") or 0,
        tied=not args.get("untie_embeddings_and_output_weights", False),
        num_experts=args.get("num_experts") or 0, moe_ffn=args.get("moe_ffn_hidden_size") or 0,
        mtp_layers=args.get("mtp_num_layers") or 0,
        shared_ffn=args.get("moe_shared_expert_intermediate_size") or 0,
        first_dense_layers=_first_dense_layers(args, where),
        **(dict(q_lora_rank=args.get("q_lora_rank") or 0, kv_lora_rank=need("kv_lora_rank"),
                qk_nope_dim=need("qk_head_dim"), qk_rope_dim=need("qk_pos_emb_head_dim"),
                v_head_dim=need("v_head_dim")) if args.get("multi_latent_attention") else {}))


def _first_dense_layers(args: dict, where: str) -> int:
    if not args.get("num_experts"):
        return 0
    from pyconv.families.deepseek_v3 import first_dense_from_freq

    return first_dense_from_freq(args.get("moe_layer_freq"), args.get("num_layers"), where)


def read(path: str, family: str | None = None) -> Catalog:
    from pyconv.io.torchzip import read_torch_checkpoint

    root = os.path.abspath(path)
    directory, iteration = _iteration_dir(root)
    numbers = _rank_numbers(directory)
    if not numbers:
        raise FormatError(f"{directory}: no mp_rank_* directories")
    first_dir = numbers[min(numbers)]

    def load_file(rank_dir):
        file = os.path.join(rank_dir, CHECKPOINT_FILE)
        if not os.path.isfile(file):
            raise FormatError(f"{rank_dir}: no {CHECKPOINT_FILE}")
        obj = read_torch_checkpoint(file).obj
        if not isinstance(obj, dict):
            raise FormatError(f"{file}: not a Megatron checkpoint (top level is not a dict)")
        _model_chunks(obj, file)
        return file, obj

    first_file, first = load_file(first_dir)
    args = _args_dict(first.get("args"), first_file)
    ranks = _rank_dirs(directory, numbers, args)
    tp, pp, ep = (max(r[i] for r in ranks) + 1 for i in range(3))
    for key, value in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp),
                       ("expert_model_parallel_size", ep)):
        if args.get(key) not in (None, value):
            raise FormatError(f"{first_file}: args say {key}={args[key]} but the directory holds {value}")
    vpp = len(_model_chunks(first, first_file))
    if (args.get("virtual_pipeline_model_parallel_size") or vpp) != vpp:
        raise FormatError(f"{first_file}: args say virtual_pipeline_model_parallel_size="
                          f"{args['virtual_pipeline_model_parallel_size']} but the file holds {vpp} model chunk(s)")
    dims = megatron_dims(args, first_file)
    etp = (args.get("expert_tensor_parallel_size") or tp) if dims.num_experts else tp
    try:
        grid = expert_grid(tp, ep, etp)
    except LayoutError as e:
        raise FormatError(f"{first_file}: {e}") from None
    expected = {(t, p, e) for p in range(pp) for t, e, _ in grid}
    for t, p, e in sorted(expected - set(ranks), key=lambda k: (k[1], k[2], k[0])):
        raise FormatError(f"{directory}: {rank_dir_name(t, p, pp, e, ep)} is missing "
                          f"(found tp={tp}, pp={pp}, ep={ep}" + (f", etp={etp})" if etp != tp else ")"))
    for t, p, e in sorted(set(ranks) - expected):
        raise FormatError(f"{directory}: {os.path.basename(ranks[(t, p, e)])} does not belong to a checkpoint "
                          f"with tp={tp}, pp={pp}, ep={ep}, etp={etp} (Megatron-LM writes no such rank)")
    layout = MegatronLayout(
        family=get_family(family) if family else _family_from_args(args, first_file), dims=dims,
        padded_vocab=args.get("padded_vocab_size") or dims.vocab,
        stages=_stages_from_args(args, dims.num_layers, pp, vpp, first_file), tp=tp, pp=pp, ep=ep, etp=etp, vpp=vpp,
        mtp_stage=_mtp_stage(args.get("pipeline_model_parallel_layout"), dims, first_file, FormatError))
    assembly = _Assembly({}, {}, [])
    for p in range(pp):
        dense_seen = set()
        for t, e, et in grid:
            file, obj = (first_file, first) if ranks[(t, p, e)] == first_dir else load_file(ranks[(t, p, e)])
            chunks = _model_chunks(obj, file)
            if len(chunks) != vpp:
                raise FormatError(f"{file}: holds {len(chunks)} model chunk(s) ({', '.join(chunks)}), but {first_file} "
                                  f"holds {vpp}")
            for chunk, stage in layout.chunks(p):
                _read_rank(file, obj, layout, t, p, e, assembly, et, dense_replica=t in dense_seen, chunk=chunk,
                           stage=stage)
            dense_seen.add(t)
    return _catalog(root, directory, iteration, layout, args, assembly)


def _model_chunks(obj: dict, file: str) -> list[str]:
    """The state dicts of a rank file: 'model', or model0..model{V-1} of an interleaved pipeline."""
    if "model" in obj:
        return ["model"]
    numbered = sorted(int(k[5:]) for k in obj if isinstance(k, str) and k.startswith("model") and k[5:].isdigit())
    if not numbered:
        raise FormatError(f"{file}: no 'model' state dict")
    if numbered != list(range(len(numbered))):
        raise FormatError(f"{file}: virtual pipeline chunks {', '.join(f'model{i}' for i in numbered)} are not "
                          f"model0..model{len(numbered) - 1}")
    return [f"model{i}" for i in numbered]


_LAYER_TYPE_CHARS = {"embedding": "E", "decoder": "t", "mtp": "m", "loss": "L"}


def _layout_text(layout) -> str | None:
    """pipeline_model_parallel_layout as its string (Megatron-Core also takes a list of stages)."""
    if isinstance(layout, list):  # the list form: [["embedding", "decoder"], ["decoder", "loss"]]
        return "|".join("".join(_LAYER_TYPE_CHARS.get(str(t).strip().lower(), "?") for t in stage)
                        for stage in layout)
    return layout or None


def _mtp_stage(layout, dims: ModelDims, where: str, error=LayoutError) -> int | None:
    """The model chunk a pipeline layout puts the MTP layers in (None without a layout: the last);
    the layout and the model must agree on how many there are."""
    text = _layout_text(layout)
    if not isinstance(text, str):
        return None
    try:
        chunk, count = layout_mtp_chunk(text)
    except LayoutError as e:
        raise error(f"{where}: {e}") from None
    if count != dims.mtp_layers:
        raise error(f"{where}: pipeline layout {text!r} places {count} MTP layer(s) (m), the model has "
                    f"{dims.mtp_layers}")
    return chunk


def _stages_from_args(args: dict, num_layers: int, pp: int, vpp: int, where: str) -> list[range]:
    """Layers of each model chunk as Megatron-Core placed them: by pipeline_model_parallel_layout,
    by counting the embedding/loss as layers (account_for_*_in_pipeline_split), or evenly with
    optional first/last stage sizes; vpp is the number of chunks in the rank files."""
    layout = args.get("pipeline_model_parallel_layout")
    embedding = bool(args.get("account_for_embedding_in_pipeline_split"))
    loss = bool(args.get("account_for_loss_in_pipeline_split"))
    first, last = args.get("decoder_first_pipeline_num_layers"), args.get("decoder_last_pipeline_num_layers")
    try:
        if layout:
            layout = _layout_text(layout)
            if not isinstance(layout, str):
                raise LayoutError(f"pipeline_model_parallel_layout is a {type(layout).__name__}, not a string")
            stages, layout_vpp = layout_stages(layout, num_layers, pp)
            if layout_vpp != vpp:
                raise LayoutError(f"pipeline_model_parallel_layout {layout!r} has {layout_vpp} model chunk(s) per "
                                  f"pipeline rank, the files hold {vpp}")
            return stages
        if embedding or loss:
            if first is not None or last is not None:
                raise LayoutError("account_for_*_in_pipeline_split and first/last pipeline stage sizes are set "
                                  "together, which Megatron-Core refuses")
            return slot_stages(num_layers, pp, vpp, embedding, loss)
        return virtual_stages(num_layers, pp, vpp, first, last)
    except LayoutError as e:
        raise FormatError(f"{where}: {e}") from None


def _read_rank(file: str, obj: dict, layout: MegatronLayout, t: int, p: int, e: int, assembly: _Assembly,
               etp_rank: int | None = None, dense_replica: bool | None = None, chunk: str = "model",
               stage: int | None = None) -> None:
    """Adds the canonical blocks one model chunk of a rank file holds (obj[chunk], model chunk
    `stage`, default p); every tensor in it must be accounted for. Dense tensors are taken from
    the first file of each TP rank (dense_replica: this file's are copies); routed experts from
    every file, as expert-TP rank etp_rank of EP rank e."""
    from pyconv.io.torchzip import TensorRef

    fam, dims, padded, tp = layout.family, layout.dims, layout.padded_vocab, layout.tp
    if dense_replica is None:
        dense_replica = e > 0
    blocks, dtypes, order = assembly.blocks, assembly.dtypes, assembly.order
    model = obj[chunk]
    if chunk != "model":
        file = f"{file} [{chunk}]"
    if not isinstance(model, dict):
        raise FormatError(f"{file}: '{chunk}' is not a state dict")
    seen = set()
    for entry in layout.entries(p if stage is None else stage, e):
        mapping, layer, local = entry.mapping, entry.layer, entry.local_layer
        candidates = list(dict.fromkeys(_fill(n, local, entry.local_expert) for n in mapping.megatron_names()))
        key = next((c for c in candidates if c in model), None)
        names = hf_names(mapping, layer, entry.expert)
        if key is None:
            if mapping.optional:
                continue
            raise FormatError(f"{file}: missing tensor '{candidates[0]}'")
        seen.add(key)
        if entry.copy:
            continue
        if mapping.hf == ("lm_head.weight",) and dims.tied:
            continue  # the last stage's copy of the tied embedding
        ref = model[key]
        if not isinstance(ref, TensorRef):
            raise FormatError(f"{file}: '{key}' is not a tensor")
        pieces = layout.pieces(mapping, names, t, etp_rank)
        expected = shard_shape(pieces, len(mapping.shape(dims)))
        whole = mapping.rule.whole_on_every_rank(layout.naming)
        for naming in mapping.rule.alternative_namings(layout.naming):
            if tuple(ref.shape) == expected:
                break
            # MLA's down projections: whole under TransformerEngine's spec, column-parallel under the local one
            try:
                other = layout.pieces(mapping, names, t, naming=naming)
            except LayoutError:
                continue
            if tuple(ref.shape) == shard_shape(other, 2):
                pieces, expected, whole = other, shard_shape(other, 2), mapping.rule.whole_on_every_rank(naming)
        if tuple(ref.shape) != expected:
            raise FormatError(f"{file}: tensor '{key}' has shape {list(ref.shape)}, expected {list(expected)} "
                              f"for tp={tp} (hidden {dims.hidden}, heads {dims.heads}, groups {dims.groups}, "
                              f"head_dim {dims.head_dim}, ffn {dims.ffn}, padded vocab {padded})")
        if (whole and t > 0) or (dense_replica and not mapping.per_expert):
            continue  # replicas: taken from the first tensor- and expert-parallel rank
        stored = StoredTensor(ref.path, ref.offset, ref.dtype, tuple(ref.shape))
        transposed = mapping.transposed and len(mapping.shape(dims)) == 2
        for piece in pieces:
            block = piece.source_block(stored, transposed)
            if block is None:
                continue
            if piece.source not in blocks:
                blocks[piece.source], dtypes[piece.source] = [], ref.dtype
                order.append(piece.source)
            if dtypes[piece.source] != ref.dtype:
                raise FormatError(f"{file}: '{key}' is {ref.dtype} but other shards of "
                                  f"{piece.source} are {dtypes[piece.source]}")
            blocks[piece.source].append(block)
    unknown = [k for k in model if k not in seen and not str(k).endswith("_extra_state")]
    if unknown:
        raise FormatError(f"{file}: tensor '{unknown[0]}' matches no {fam.name} mapping for pipeline stage {p}"
                          + (f", model chunk {chunk[5:]}" if chunk != "model" else "")
                          + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))


def _catalog(root: str, directory: str, iteration: str, layout: MegatronLayout, args: dict,
             assembly: _Assembly) -> Catalog:
    fam, dims, blocks, dtypes, order = layout.family, layout.dims, assembly.blocks, assembly.dtypes, assembly.order
    tensors = {}
    for name in _hf_order(fam, dims, order):
        mapping, index, _, _ = fam.match_hf(name) or fam.match_mtp_hf(name)
        shape = _hf_shape(mapping, index, dims)
        tensors[name] = CanonicalTensor.assembled(name, dtypes[name], shape, blocks[name], directory)
    for name, source in mtp_hf_copies(fam, dims).items():  # HF keeps its own copies in each MTP layer
        tensors[name] = CanonicalTensor.assembled(name, dtypes[source], tensors[source].shape, blocks[source],
                                                  directory)
    config = fam.hf_config_from_megatron(args)
    dtype = next(iter(dtypes.values()), None)
    if dtype in FLOAT_DTYPES:
        config["dtype"] = TORCH_NAME[dtype]
    extra = tuple((os.path.join(root, n), os.path.getsize(os.path.join(root, n))) for n in sorted(os.listdir(root))
                  if n != TRACKER and not n.startswith(".") and os.path.isfile(os.path.join(root, n)))
    details = {"family": fam.name, "tp": layout.tp, "pp": layout.pp, **({"vpp": layout.vpp} if layout.vpp > 1 else {}),
               "ep": layout.ep,
               **({"etp": layout.expert_tp} if dims.num_experts else {}), "iteration": iteration,
               "padded_vocab_size": layout.padded_vocab,
               "args": {k: args[k] for k in sorted(args) if k in _ARGS_SUMMARY}}
    return Catalog("megatron", root, tensors, config, fam.architectures[0], extra, details=details)


_ARGS_SUMMARY = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                 "kv_channels", "normalization", "swiglu", "position_embedding_type", "padded_vocab_size",
                 "vocab_size", "untie_embeddings_and_output_weights", "params_dtype",
                 "tensor_model_parallel_size", "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size",
                 "pipeline_model_parallel_layout", "qk_layernorm", "num_experts", "mtp_num_layers")


def _family_from_args(args: dict, where: str) -> Family:
    from pyconv.families.common import original_hf_config

    archs = original_hf_config(args).get("architectures")
    if isinstance(archs, list) and archs:
        return family_for_architecture(archs[0], where)
    return family_for_megatron_args(args, where)


def _hf_shape(mapping: TensorMapping, index: int, dims: ModelDims) -> tuple[int, ...]:
    return mapping.rule.part_shape(mapping.shape(dims), index, len(mapping.hf), dims)


def _hf_order(family: Family, dims: ModelDims, names: list[str]) -> list[str]:
    """Canonical tensors in the HF order: embeddings, layer by layer (experts in order), final
    norm, head."""
    present = set(names)
    stages = [range(dims.num_layers)]
    ordered = []
    for entry in _stage_entries(family, dims, 0, stages, 0, 1):
        ordered.extend(n for n in hf_names(entry.mapping, entry.layer, entry.expert) if n in present)
    return list(dict.fromkeys(ordered))


# ---- writing ---------------------------------------------------------------------------

_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def dropped_layers(catalog: Catalog, family: Family, dims: ModelDims) -> list[int]:
    """HF layers past num_hidden_layers (and its multi-token-prediction layers) that the family
    drops (DeepSeek-V3's MTP layers when the config does not count them), in order."""
    if not family.drops_extra_layers:
        return []
    found = {int(m.group(1)) for m in map(_HF_LAYER.match, catalog.tensors) if m}
    return sorted(i for i in found if i >= dims.num_layers + dims.mtp_layers)


def _check_shapes(catalog: Catalog, family: Family, dims: ModelDims) -> None:
    dropped = set(dropped_layers(catalog, family, dims))
    scales = scale_names(catalog.tensors)
    copies = mtp_hf_copies(family, dims)
    for name, tensor in catalog.tensors.items():
        extra = _HF_LAYER.match(name)
        if (extra and int(extra.group(1)) in dropped) or name in scales:
            continue
        if name in copies:  # Megatron shares the model's; the copy must at least have its shape
            source = catalog.tensors.get(copies[name])
            if source is not None and tuple(tensor.shape) != tuple(source.shape):
                raise LayoutError(f"{catalog.path}: tensor '{name}' has shape {list(tensor.shape)}, "
                                  f"'{copies[name]}' {list(source.shape)}")
            continue
        match = family.match_hf(name, dims) or family.match_mtp_hf(name)
        if match is None:
            if family.is_ignored_hf(name):
                continue
            raise LayoutError(f"{catalog.path}: tensor '{name}' matches no {family.name} mapping")
        mapping, index, layer, expert = match
        if layer is not None and layer >= dims.num_layers + dims.mtp_layers:
            raise LayoutError(f"{catalog.path}: tensor '{name}' is layer {layer} of a {dims.num_layers}-layer model")
        if not mapping.applies_to(dims, layer):
            raise LayoutError(f"{catalog.path}: tensor '{name}' does not belong in "
                              + (f"layer {layer} ({dims.layer_kind(layer)} MLP)" if layer is not None else "this model")
                              + f" of this {family.name} config")
        if expert is not None and expert >= dims.num_experts:
            raise LayoutError(f"{catalog.path}: tensor '{name}' is expert {expert} of {dims.num_experts}")
        expected = _hf_shape(mapping, index, dims)
        if tuple(tensor.shape) != expected:
            raise LayoutError(f"{catalog.path}: tensor '{name}' has shape {list(tensor.shape)}, the config implies "
                              f"{list(expected)}")


def family_and_dims(catalog: Catalog, with_mtp: bool = False) -> tuple[Family, ModelDims]:
    """The family table and model dims of a catalog about to be written in a Megatron format,
    with every tensor checked against them. Multi-token-prediction layers count only with_mtp
    (the formats that write them) and when the checkpoint holds them; else they are dropped."""
    if catalog.config is None:
        raise LayoutError(f"{catalog.path}: no config.json: cannot derive Megatron args")
    family = family_for_architecture(catalog.architecture, catalog.path)
    dims = family.dims_from_hf(catalog.config)
    if dims.mtp_layers and not (with_mtp and _holds_layer(catalog, dims.num_layers)):
        dims = replace(dims, mtp_layers=0)
    _check_shapes(catalog, family, dims)
    return family, dims


def _holds_layer(catalog: Catalog, layer: int) -> bool:
    return any((m := _HF_LAYER.match(n)) and int(m.group(1)) == layer for n in catalog.tensors)


class PlannedFiles(list):
    """The planned files, with notes for the plan (what was dropped and why)."""

    notes: tuple[str, ...] = ()


def attention_notes(config: dict) -> tuple[str, ...]:
    """What Megatron-LM's args do not carry of an HF model's attention: a sliding window (Mistral's
    sliding_window, Qwen2's with use_sliding_window). The weights are the same; Megatron-Core's
    attention is full causal unless run with --window-size, so it differs past the window."""
    window = config.get("sliding_window")
    if str(config.get("model_type", "")).startswith("qwen") and not config.get("use_sliding_window"):
        window = None
    limit = config.get("max_position_embeddings")
    if isinstance(window, int) and not isinstance(window, bool) and (not isinstance(limit, int) or window < limit):
        return (f"sliding_window {window} is not in the Megatron args: Megatron-Core attends over the whole causal "
                f"context unless run with --window-size, so sequences longer than {window} tokens differ from the "
                f"HF model there",)
    return ()


def plan_output(catalog: Catalog, target: TargetSpec) -> list[PlannedFile]:
    family, dims = family_and_dims(catalog, with_mtp=True)
    config = catalog.config
    tp, pp, ep = target.tp, target.pp, target.ep
    etp = tp if getattr(target, "etp", None) is None else target.etp
    if tp < 1 or pp < 1 or ep < 1 or etp < 1:
        raise LayoutError(f"tp, pp, ep and etp must be >= 1 (got tp={tp}, pp={pp}, ep={ep}, etp={etp})")
    if ep > 1 and not dims.num_experts:
        raise LayoutError(f"ep={ep} needs a mixture-of-experts model; {catalog.architecture} has no experts")
    if etp != tp and not dims.num_experts:
        raise LayoutError(f"etp={etp} needs a mixture-of-experts model; {catalog.architecture} has no experts")
    experts_per_rank(dims, ep)
    grid = sorted(expert_grid(tp, ep, etp))
    fp8 = [n for n, t in catalog.tensors.items() if t.dtype == "F8_E4M3"]
    if fp8 and target.dtype in (None, "F8_E4M3"):
        raise LayoutError(f"{catalog.path}: '{fp8[0]}' (and {len(fp8) - 1} more) is fp8 with block scales, which a "
                          f"Megatron checkpoint cannot hold: pass --dtype bf16 (or fp16/fp32) to dequantize")
    if target.megatron_naming not in ("te", "local"):
        raise LayoutError(f"unknown Megatron naming '{target.megatron_naming}' (te or local)")
    padded = padded_vocab_size(dims.vocab, target.vocab_divisible_by, tp)
    vpp = target.vpp
    if target.pipeline_layout:
        if target.first_stage_layers is not None or target.last_stage_layers is not None:
            raise LayoutError("a pipeline layout places every layer itself: leave out the first/last stage sizes")
        stages, layout_vpp = layout_stages(target.pipeline_layout, dims.num_layers, pp)
        if vpp not in (1, layout_vpp):
            raise LayoutError(f"pipeline layout {target.pipeline_layout!r} gives vpp={layout_vpp}, not {vpp}")
        vpp = layout_vpp
        mtp_stage = _mtp_stage(target.pipeline_layout, dims, catalog.path)
    else:
        mtp_stage = None
        stages = virtual_stages(dims.num_layers, pp, vpp, target.first_stage_layers, target.last_stage_layers)
    iteration_dir = "release" if target.iteration is None else f"iter_{target.iteration:07d}"
    source_dtype = next((t.dtype for t in catalog.tensors.values() if t.dtype in FLOAT_DTYPES), "F32")
    params_dtype = target.dtype or source_dtype
    args = {
        **family.megatron_args_from_hf(config, dims),
        "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
        **({"expert_model_parallel_size": ep, "expert_tensor_parallel_size": etp,
            "moe_grouped_gemm": target.moe_grouped_gemm} if dims.num_experts else {}),
        "padded_vocab_size": padded, "make_vocab_size_divisible_by": target.vocab_divisible_by,
        "params_dtype": TorchDtypeValue(TORCH_NAME.get(params_dtype, "float32")),
        "bf16": params_dtype == "BF16", "fp16": params_dtype == "F16",
        "decoder_first_pipeline_num_layers": target.first_stage_layers,
        "decoder_last_pipeline_num_layers": target.last_stage_layers,
        **({"pipeline_model_parallel_layout": target.pipeline_layout} if target.pipeline_layout else {}),
        **({"virtual_pipeline_model_parallel_size": vpp, "num_virtual_stages_per_pipeline_rank": vpp,
            "num_layers_per_virtual_pipeline_stage": (len(stages[0]) if len({len(s) for s in stages}) == 1
                                                      and not target.pipeline_layout else None)} if vpp > 1 else {}),
        "iteration": target.iteration or 0,
        # The source config travels with the args so Megatron -> HF restores it (ids, rope scaling...).
        "pyconv_hf_config": json.dumps(config, sort_keys=True),
    }
    layout = MegatronLayout(family, dims, padded, stages, tp, pp, ep, etp, target.megatron_naming, vpp, mtp_stage)
    files = PlannedFiles()
    for p in range(pp):
        for t, e, et in grid:
            files.append(_plan_rank_file(catalog, layout, target, args, iteration_dir, t, p, e, et))
    tracker = "release" if target.iteration is None else str(target.iteration)
    files.append(plan_text_file(TRACKER, tracker))
    for path, size in catalog.extra_files:
        files.append(plan_file_copy(path, size, os.path.basename(path)))
    dropped = dropped_layers(catalog, family, dims)
    if dropped:
        count = sum(1 for n in catalog.tensors if (m := _HF_LAYER.match(n)) and int(m.group(1)) in dropped)
        files.notes = (f"dropped {count} tensors of layers {', '.join(map(str, dropped))} (index >= "
                       f"num_hidden_layers {dims.num_layers}: multi-token-prediction layers, not part of the "
                       f"Megatron model)",)
    files.notes += attention_notes(config)
    return files


def _plan_rank_file(catalog: Catalog, layout: MegatronLayout, target: TargetSpec, args: dict, iteration_dir: str,
                    t: int, p: int, e: int, et: int | None = None) -> PlannedFile:
    """One model_optim_rng.pt: the torch.save layout of its state dict(s), each tensor's block copies."""
    pp, ep = layout.pp, layout.ep
    obj = {"args": Namespace(**args), "checkpoint_version": CHECKPOINT_VERSION, "iteration": target.iteration or 0}
    planned: list[tuple[str, str, tuple[int, ...], list[BlockCopy]]] = []
    for chunk, stage in layout.chunks(p):
        obj[chunk] = _plan_chunk(catalog, layout, target, t, e, et, stage, planned)
    layout, slots = layout_torch_save(obj)
    assert len(slots) == len(planned)
    tensors = tuple(PlannedTensor(name, dtype, shape, offset, tuple(copies))
                    for (name, dtype, shape, copies), offset in zip(planned, layout.record_offsets))
    path = f"{iteration_dir}/{rank_dir_name(t, p, pp, e, ep)}/{CHECKPOINT_FILE}"
    return PlannedFile(path, layout.size, tensors, layout.literals)


def _plan_chunk(catalog: Catalog, layout: MegatronLayout, target: TargetSpec, t: int, e: int, et: int | None,
                stage: int, planned: list) -> OrderedDict:
    """The state dict of model chunk `stage` (slots in torch.save order); appends its tensors to planned."""
    family, dims = layout.family, layout.dims
    model: OrderedDict[str, TensorSlot] = OrderedDict()
    for entry in layout.entries(stage, e):
        mapping, layer, local = entry.mapping, entry.layer, entry.local_layer
        names = hf_names(mapping, layer, entry.expert)
        if mapping.hf == ("lm_head.weight",) and dims.tied:
            if len(layout.stages) == 1:
                continue  # the output layer shares the embedding on a single stage
            # The last stage carries a copy of the word embedding.
            names = [family.word_embedding.hf[0]]
        missing = [n for n in names if n not in catalog.tensors]
        if missing:
            if mapping.optional and len(missing) == len(names):
                continue
            raise LayoutError(f"{catalog.path}: tensor '{missing[0]}' is missing")
        pieces = layout.pieces(mapping, names, t, et)
        transposed = mapping.transposed and len(mapping.shape(dims)) == 2
        dtype = output_dtype(catalog.tensors[names[0]], None if mapping.keep_dtype else target.dtype)
        copies = [c for piece in pieces for c in piece.copies(catalog.tensors[piece.source], transposed, dtype)]
        shape = shard_shape(pieces, len(mapping.shape(dims)))
        grouped = target.moe_grouped_gemm and isinstance(mapping.megatron, dict) and "grouped" in mapping.megatron
        naming = "grouped" if grouped else target.megatron_naming
        name = megatron_tensor_name(mapping, naming, local, entry.local_expert)
        model[name] = TensorSlot(dtype, shape)
        planned.append((name, dtype, shape, copies))
    return model


register_format("megatron", detect=detect, read=read, plan_output=plan_output, read_options=("family",))
