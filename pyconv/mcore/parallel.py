"""Parallel layout and placement: which tensor-, pipeline- and expert-parallel rank holds which
tensor (and which rows of it), the virtual pipeline and pipeline layouts, rank directory names."""

from __future__ import annotations

from dataclasses import dataclass

from pyconv.catalog import view2d
from pyconv.errors import FormatError, LayoutError
from pyconv.families import (
    FIRST_STAGE,
    LAST_STAGE,
    LAYER,
    Family,
    ModelDims,
    TensorMapping,
)
from pyconv.layout import (
    Piece,
    layout_mtp_chunk,
    layout_stages,
    slot_stages,
    virtual_stages,
)
from pyconv.layout.rules import ExpertPartition


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
        return stage_entries(self.family, self.dims, stage, self.stages, ep_rank, self.ep, self.mtp_stage)

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



def stage_entries(family: Family, dims: ModelDims, stage: int, stages: list[range], ep_rank: int, ep: int,
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
    experts = ExpertPartition(dims.num_experts, ep).experts_of(ep_rank)
    for local, layer in enumerate(stages[stage]):
        for m in family.mappings:
            if m.where != LAYER or not m.applies_to(dims, layer):
                continue
            if m.per_expert:
                yield from (Entry(m, layer, local, e, j) for e, j in experts)
            else:
                yield Entry(m, layer, local)
    tail = [m for m in family.mappings if m.where == LAST_STAGE]
    if final_norm_here:
        yield from (Entry(m, None, None) for m in tail if m.megatron_names()[0].startswith("decoder."))
    if mtp_here:
        yield from mtp_entries(family, dims, experts)
    if last:
        yield from (Entry(m, None, None) for m in tail if not m.megatron_names()[0].startswith("decoder."))


def mtp_entries(family: Family, dims: ModelDims, experts: list[tuple[int, int]]):
    """Megatron-Core's mtp.layers.i: enorm, hnorm, eh_proj, its transformer layer (HF layer
    num_layers + i), final_layernorm; `experts`: the (global, local) experts of this EP rank."""
    for i in range(dims.mtp_layers):
        layer = dims.num_layers + i
        for m in family.mtp_layer_mappings(dims):
            if m.per_expert:
                yield from (Entry(m, layer, i, e, j) for e, j in experts)
            else:
                yield Entry(m, layer, i)


LAYER_TYPE_CHARS = {"embedding": "E", "decoder": "t", "mtp": "m", "loss": "L"}


def layout_text(layout) -> str | None:
    """pipeline_model_parallel_layout as its string (Megatron-Core also takes a list of stages)."""
    if isinstance(layout, list):  # the list form: [["embedding", "decoder"], ["decoder", "loss"]]
        return "|".join("".join(LAYER_TYPE_CHARS.get(str(t).strip().lower(), "?") for t in stage)
                        for stage in layout)
    return layout or None


def layout_mtp_stage(layout, dims: ModelDims, where: str, error=LayoutError) -> int | None:
    """The model chunk a pipeline layout puts the MTP layers in (None without a layout: the last);
    the layout and the model must agree on how many there are."""
    text = layout_text(layout)
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


def stages_from_args(args: dict, num_layers: int, pp: int, vpp: int, where: str) -> list[range]:
    """Layers of each model chunk as Megatron-Core placed them: by pipeline_model_parallel_layout,
    by counting the embedding/loss as layers (account_for_*_in_pipeline_split), or evenly with
    optional first/last stage sizes; vpp is the number of chunks in the rank files."""
    layout = args.get("pipeline_model_parallel_layout")
    embedding = bool(args.get("account_for_embedding_in_pipeline_split"))
    loss = bool(args.get("account_for_loss_in_pipeline_split"))
    first, last = args.get("decoder_first_pipeline_num_layers"), args.get("decoder_last_pipeline_num_layers")
    try:
        if layout:
            layout = layout_text(layout)
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
