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
from argparse import Namespace
from collections import OrderedDict
from dataclasses import dataclass

from pyconv.catalog import Catalog
from pyconv.dtypes import TORCH_NAME, model_dtype, output_dtype
from pyconv.errors import FormatError, LayoutError
from pyconv.families import (
    get_family,
)
from pyconv.io.torchsave import TensorSlot, TorchDtypeValue, layout_torch_save
from pyconv.layout import (
    layout_stages,
    padded_vocab_size,
    virtual_stages,
)
from pyconv.layout.rules import ExpertPartition
from pyconv.mcore.assemble import Assembly, assembled_catalog, read_rank
from pyconv.mcore.checkpoint import (
    CHECKPOINT_FILE,
    CHECKPOINT_VERSION,
    RANK_DIR,
    TRACKER,
    RankFiles,
    args_dict,
    find_rank_files,
    iteration_dir,
    iteration_dirs,
    skipped_training_state,
)
from pyconv.mcore.config import (
    HF_LAYER,
    attention_notes,
    check_naming,
    check_tensor_parallel,
    dropped_layers,
    family_and_dims,
    family_from_args,
    megatron_dims,
    refuse_fp8_weights,
)
from pyconv.mcore.names import hf_names, megatron_tensor_name
from pyconv.mcore.parallel import (
    MegatronLayout,
    expert_grid,
    layout_mtp_stage,
    rank_dir_name,
    shard_shape,
    stages_from_args,
)
from pyconv.plan import (
    BlockCopy,
    PlannedFile,
    PlannedFiles,
    PlannedTensor,
    TargetSpec,
    plan_file_copy,
    plan_text_file,
)

READ_OPTIONS = ("family",)  # read(path, family=...): the family of a checkpoint whose args do not tell it


# ---- the layout of one mapping on one rank -------------------------------------------------


# ---- reading ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    tp: int = 1
    pp: int = 1
    vpp: int = 1                           # model chunks per pipeline rank (interleaved schedule)
    pipeline_layout: str | None = None     # Megatron-Core's pipeline_model_parallel_layout ("Et|tt|tL")
    ep: int = 1                            # expert parallel size
    etp: int | None = None                 # expert tensor parallel size (None: tp)
    megatron_naming: str = "te"            # "te" (TransformerEngine fused norms) or "local"
    moe_grouped_gemm: bool = False         # experts as TransformerEngine's grouped GEMM (linear_fc1.weightJ)
    iteration: int | None = None           # None: release/
    vocab_divisible_by: int = 128          # Megatron's make_vocab_size_divisible_by
    first_stage_layers: int | None = None  # Megatron's decoder_first_pipeline_num_layers
    last_stage_layers: int | None = None   # Megatron's decoder_last_pipeline_num_layers



def _rank_files(numbers: dict[tuple[int, ...], str], args: dict) -> dict[tuple[int, int, int], str]:
    """(tp, pp, ep) rank -> rank file. Two numbers are (tp, pp) or (tp, ep), as the args say."""
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
    if os.path.isfile(path):  # one rank file (megatron-legacy, detected first, declines Megatron-Core trees)
        return _is_rank_file(path)
    if not os.path.isdir(path):
        return False
    if os.path.isfile(os.path.join(path, TRACKER)) or any(RANK_DIR.match(e) for e in os.listdir(path)):
        return True
    # iterations without the tracker: reading says which to choose
    return any(RANK_DIR.match(e) for d in iteration_dirs(path) for e in os.listdir(os.path.join(path, d)))


def _is_rank_file(path: str) -> bool:
    from pyconv.io.torchzip import read_torch_checkpoint

    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":
                return False
        obj = read_torch_checkpoint(path).obj
    except (OSError, FormatError):
        return False
    return isinstance(obj, dict) and ("model" in obj or "model0" in obj)


def read(path: str, family: str | None = None) -> Catalog:
    from pyconv.io.torchzip import read_torch_checkpoint

    root = os.path.abspath(path)
    if os.path.isfile(root):  # one rank file: a checkpoint of tp = pp = ep = 1
        directory, iteration = os.path.dirname(root), "release"
        found = RankFiles({(0,): root}, ())
    else:
        directory, iteration = iteration_dir(root)
        found = find_rank_files(directory)
    numbers = found.ranks
    first_path = numbers[min(numbers)]
    objects = []

    def load_file(file):
        obj = read_torch_checkpoint(file).obj
        if not isinstance(obj, dict):
            raise FormatError(f"{file}: not a Megatron checkpoint (top level is not a dict)")
        _model_chunks(obj, file)
        objects.append(obj)
        return file, obj

    first_file, first = load_file(first_path)
    args = args_dict(first.get("args"), first_file)
    ranks = _rank_files(numbers, args)
    tp, pp, ep = (max(r[i] for r in ranks) + 1 for i in range(3))
    for key, value in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp),
                       ("expert_model_parallel_size", ep)):
        if args.get(key) not in (None, value):
            if os.path.isfile(root):
                raise FormatError(f"{first_file}: one rank of a checkpoint with {key}={args[key]}: convert the "
                                  f"directory holding all of its mp_rank_* directories")
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
        raise FormatError(f"{directory}: {os.path.basename(os.path.dirname(ranks[(t, p, e)]))} does not belong to a checkpoint "
                          f"with tp={tp}, pp={pp}, ep={ep}, etp={etp} (Megatron-LM writes no such rank)")
    layout = MegatronLayout(
        family=get_family(family) if family else family_from_args(args, first_file), dims=dims,
        padded_vocab=args.get("padded_vocab_size") or dims.vocab,
        stages=stages_from_args(args, dims.num_layers, pp, vpp, first_file), tp=tp, pp=pp, ep=ep, etp=etp, vpp=vpp,
        mtp_stage=layout_mtp_stage(args.get("pipeline_model_parallel_layout"), dims, first_file, FormatError))
    assembly = Assembly({}, {}, [])
    for p in range(pp):
        dense_seen = set()
        for t, e, et in grid:
            file, obj = (first_file, first) if ranks[(t, p, e)] == first_path else load_file(ranks[(t, p, e)])
            chunks = _model_chunks(obj, file)
            if len(chunks) != vpp:
                raise FormatError(f"{file}: holds {len(chunks)} model chunk(s) ({', '.join(chunks)}), but {first_file} "
                                  f"holds {vpp}")
            for chunk, stage in layout.chunks(p):
                read_rank(file, obj, layout, t, p, e, assembly, et, dense_replica=t in dense_seen, chunk=chunk,
                           stage=stage)
            dense_seen.add(t)
    catalog = assembled_catalog(root, directory, iteration, layout, args, assembly)
    note = skipped_training_state(found.optimizer_files, objects)
    catalog.notes = (note,) if note else ()
    return catalog


def _model_chunks(obj: dict, file: str) -> list[str]:
    """The state dicts of a rank file: 'model', or model0..model{V-1} of an interleaved pipeline."""
    if "model" in obj:
        return ["model"]
    numbered = sorted(int(k[5:]) for k in obj if isinstance(k, str) and k.startswith("model") and k[5:].isascii() and k[5:].isdigit())
    if not numbered:
        raise FormatError(f"{file}: no 'model' state dict")
    if numbered != list(range(len(numbered))):
        raise FormatError(f"{file}: virtual pipeline chunks {', '.join(f'model{i}' for i in numbered)} are not "
                          f"model0..model{len(numbered) - 1}")
    return [f"model{i}" for i in numbered]


# ---- writing ---------------------------------------------------------------------------


def plan_output(catalog: Catalog, target: TargetSpec) -> list[PlannedFile]:
    family, dims = family_and_dims(catalog, with_mtp=True)
    config = catalog.config
    tp, pp, ep = target.options.tp, target.options.pp, target.options.ep
    etp = tp if target.options.etp is None else target.options.etp
    if tp < 1 or pp < 1 or ep < 1 or etp < 1:
        raise LayoutError(f"tp, pp, ep and etp must be >= 1 (got tp={tp}, pp={pp}, ep={ep}, etp={etp})")
    if ep > 1 and not dims.num_experts:
        raise LayoutError(f"ep={ep} needs a mixture-of-experts model; {catalog.architecture} has no experts")
    if etp != tp and not dims.num_experts:
        raise LayoutError(f"etp={etp} needs a mixture-of-experts model; {catalog.architecture} has no experts")
    check_tensor_parallel(dims, tp, family)
    ExpertPartition(dims.num_experts, ep).per_rank  # ep must divide the experts
    grid = sorted(expert_grid(tp, ep, etp))
    refuse_fp8_weights(catalog, target.dtype)
    check_naming(family, target.options.megatron_naming)
    padded = padded_vocab_size(dims.vocab, target.options.vocab_divisible_by, tp)
    vpp = target.options.vpp
    if target.options.pipeline_layout:
        if target.options.first_stage_layers is not None or target.options.last_stage_layers is not None:
            raise LayoutError("a pipeline layout places every layer itself: leave out the first/last stage sizes")
        stages, layout_vpp = layout_stages(target.options.pipeline_layout, dims.num_layers, pp)
        if vpp not in (1, layout_vpp):
            raise LayoutError(f"pipeline layout {target.options.pipeline_layout!r} gives vpp={layout_vpp}, not {vpp}")
        vpp = layout_vpp
        mtp_stage = layout_mtp_stage(target.options.pipeline_layout, dims, catalog.path)
    else:
        mtp_stage = None
        stages = virtual_stages(dims.num_layers, pp, vpp, target.options.first_stage_layers, target.options.last_stage_layers)
    iteration_dir = "release" if target.options.iteration is None else f"iter_{target.options.iteration:07d}"
    params_dtype = model_dtype(target.dtype, (t.dtype for t in catalog.tensors.values()))
    args = {
        **family.megatron_args_from_hf(config, dims),
        "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
        **({"expert_model_parallel_size": ep, "expert_tensor_parallel_size": etp,
            "moe_grouped_gemm": target.options.moe_grouped_gemm} if dims.num_experts else {}),
        "padded_vocab_size": padded, "make_vocab_size_divisible_by": target.options.vocab_divisible_by,
        "params_dtype": TorchDtypeValue(TORCH_NAME.get(params_dtype, "float32")),
        "bf16": params_dtype == "BF16", "fp16": params_dtype == "F16",
        "decoder_first_pipeline_num_layers": target.options.first_stage_layers,
        "decoder_last_pipeline_num_layers": target.options.last_stage_layers,
        **({"pipeline_model_parallel_layout": target.options.pipeline_layout} if target.options.pipeline_layout else {}),
        **({"virtual_pipeline_model_parallel_size": vpp, "num_virtual_stages_per_pipeline_rank": vpp,
            "num_layers_per_virtual_pipeline_stage": (len(stages[0]) if len({len(s) for s in stages}) == 1
                                                      and not target.options.pipeline_layout else None)} if vpp > 1 else {}),
        "iteration": target.options.iteration or 0,
        # The source config travels with the args so Megatron -> HF restores it (ids, rope scaling...).
        "pyconv_hf_config": json.dumps(config, sort_keys=True),
    }
    layout = MegatronLayout(family, dims, padded, stages, tp, pp, ep, etp, target.options.megatron_naming, vpp, mtp_stage)
    files = PlannedFiles()
    for p in range(pp):
        for t, e, et in grid:
            files.append(_plan_rank_file(catalog, layout, target, args, iteration_dir, t, p, e, et))
    tracker = "release" if target.options.iteration is None else str(target.options.iteration)
    files.append(plan_text_file(TRACKER, tracker))
    for path, size in catalog.extra_files:
        files.append(plan_file_copy(path, size, os.path.basename(path)))
    dropped = dropped_layers(catalog, family, dims)
    if dropped:
        count = sum(1 for n in catalog.tensors if (m := HF_LAYER.match(n)) and int(m.group(1)) in dropped)
        files.notes = (f"dropped {count} tensors of layers {', '.join(map(str, dropped))} (index >= "
                       f"num_hidden_layers {dims.num_layers}: multi-token-prediction layers, not part of the "
                       f"Megatron model)",)
    files.notes += attention_notes(config, args)
    return files


def _plan_rank_file(catalog: Catalog, layout: MegatronLayout, target: TargetSpec, args: dict, iteration_dir: str,
                    t: int, p: int, e: int, et: int | None = None) -> PlannedFile:
    """One model_optim_rng.pt: the torch.save layout of its state dict(s), each tensor's block copies."""
    pp, ep = layout.pp, layout.ep
    obj = {"args": Namespace(**args), "checkpoint_version": CHECKPOINT_VERSION, "iteration": target.options.iteration or 0}
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
        grouped = target.options.moe_grouped_gemm and isinstance(mapping.megatron, dict) and "grouped" in mapping.megatron
        naming = "grouped" if grouped else target.options.megatron_naming
        name = megatron_tensor_name(mapping, naming, local, entry.local_expert)
        model[name] = TensorSlot(dtype, shape)
        planned.append((name, dtype, shape, copies))
    return model
