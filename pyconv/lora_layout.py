"""A PEFT LoRA adapter carried between Hugging Face's layout and Megatron-Bridge's, without merging:
per-rank adapter tensors under the names Megatron-Bridge's CanonicalLoRA gives them, split across
tensor-parallel ranks as its ParallelLinearAdapter splits them, and back. Block copies only, so
the round trip is bitwise.

Followed (NVIDIA-NeMo/Megatron-Bridge): peft/canonical_lora.py @ 869bb397 (q, k, v and gate, up
as separate adapters `adapter_q`, `adapter_k`, `adapter_v`, `adapter_gate`, `adapter_up` of
linear_qkv and linear_fc1), peft/adapter_wrapper.py @ 2afd2d34 (the adapter's state under
`<linear>.adapter.`, the base weight keeping its name), peft/utils.py @ 29836cce
(ParallelLinearAdapter: linear_in [dim, in] and linear_out [out, dim]; under a column-parallel
base, linear_in is a ColumnParallelLinear, split along dim, and linear_out a ColumnParallelLinear,
split along out; under a row-parallel base, linear_in is a RowParallelLinear, split along in, and
linear_out still split along out; the output scaled by alpha / dim).

Megatron side: DST/release/mp_rank_TT/model_optim_rng.pt (torch.save) holding {"model": the
adapter tensors, "checkpoint_version", "iteration", "lora": {"family", "dim", "alpha", "tp",
"peft_config"}} and the tracker; pp 1. The original adapter_config.json travels in peft_config,
so converting back writes it unchanged."""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass

from pyconv.catalog import CanonicalTensor, SourceBlock, view2d
from pyconv.errors import FormatError, LayoutError, OutputError
from pyconv.families import GATED_FC1, LAYER, QKV, ROW, COLUMN, Family, family_for_architecture, get_family
from pyconv.lora import CONFIG_FILE, PEFT_PREFIX, read_adapter
from pyconv.mcore.checkpoint import CHECKPOINT_FILE, CHECKPOINT_VERSION, TRACKER
from pyconv.plan import PlannedFile, PlannedTensor, ReshardPlan, copies_for_region, plan_text_file

SUB_ADAPTERS = {QKV.name: ("adapter_q", "adapter_k", "adapter_v"), GATED_FC1.name: ("adapter_gate", "adapter_up")}
RELEASE = "release"
META_KEY = "lora"


@dataclass(frozen=True)
class AdapterModule:
    """One HF module's factors and the Megatron-Bridge adapter they become."""

    hf_module: str         # model.layers.0.self_attn.q_proj
    megatron_prefix: str   # decoder.layers.0.self_attention.linear_qkv.adapter.adapter_q.
    row_parallel: bool     # the base linear is row-parallel: linear_in splits along in
    a: CanonicalTensor     # lora_A / linear_in, [dim, in]
    b: CanonicalTensor     # lora_B / linear_out, [out, dim]


def _megatron_prefix(family: Family, hf_module: str, where: str) -> tuple[str, bool]:
    found = family.match_hf(hf_module + ".weight")
    if found is None:
        raise LayoutError(f"{where}: module {hf_module} is not a weight of the {family.name} family")
    mapping, index, layer, expert = found
    rule = mapping.rule.name
    if mapping.where != LAYER or expert is not None or rule not in (QKV.name, GATED_FC1.name, COLUMN.name, ROW.name) \
            or (rule in SUB_ADAPTERS and len(mapping.hf) != len(SUB_ADAPTERS[rule])):
        raise LayoutError(f"{where}: an adapter on {hf_module} has no place in Megatron-Bridge's LoRA layout "
                          f"(pyconv carries adapters of attention and dense MLP linears)")
    base = mapping.megatron_name("te").replace("*", str(layer))
    if not base.endswith(".weight"):
        raise LayoutError(f"{where}: {hf_module} maps to {base}, not a weight")
    prefix = base[:-len("weight")] + "adapter."
    if rule in SUB_ADAPTERS:
        prefix += SUB_ADAPTERS[rule][index] + "."
    return prefix, rule == ROW.name


def _split(rows: int, cols: int, tp: int, along_rows: bool, what: str) -> list[tuple[int, int, int, int]]:
    """(row0, col0, rows, cols) of each rank's part."""
    n = rows if along_rows else cols
    if n % tp:
        raise LayoutError(f"{what}: {n} {'rows' if along_rows else 'columns'} do not divide into {tp} ranks")
    step = n // tp
    return [(t * step, 0, step, cols) if along_rows else (0, t * step, rows, step) for t in range(tp)]


def plan_to_megatron(adapter_path: str, base_path: str, tp: int) -> ReshardPlan:
    """The plan writing a PEFT adapter in Megatron-Bridge's per-rank layout (see the module doc)."""
    from pyconv.formats import read_checkpoint
    from pyconv.io.torchsave import TensorSlot, layout_torch_save

    if tp < 1:
        raise LayoutError(f"tp must be a positive integer, got {tp}")
    adapter = read_adapter(adapter_path)
    config = adapter.config
    base = read_checkpoint(base_path)
    family = family_for_architecture(base.architecture, base.path)
    if adapter.replaced:
        raise LayoutError(f"{adapter.path}: it saves whole weights ({', '.join(sorted(adapter.replaced))}); "
                          "Megatron-Bridge's LoRA layout holds adapter factors only")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise LayoutError(f"{adapter.path}: rank_pattern / alpha_pattern: Megatron-Bridge's LoRA has one dim and alpha")
    modules = []
    for weight, delta in sorted(adapter.deltas.items()):
        module = weight[:-len(".weight")]
        if delta.left_transposed or delta.right_transposed:
            raise LayoutError(f"{adapter.path}: {module} is an embedding or fan_in_fan_out adapter; Megatron-Bridge's "
                              "LoRA layout holds linear adapters only")
        prefix, row_parallel = _megatron_prefix(family, module, adapter.path)
        modules.append(AdapterModule(module, prefix, row_parallel, CanonicalTensor.whole(module + ".lora_A", delta.right),
                                     CanonicalTensor.whole(module + ".lora_B", delta.left)))
    if not modules:
        raise LayoutError(f"{adapter.path}: no adapter factors to carry")
    dims = {m.a.shape[0] for m in modules}
    scales = {d.scale for d in adapter.deltas.values()}
    if len(dims) != 1 or len(scales) != 1:
        raise LayoutError(f"{adapter.path}: modules of different ranks or scales; Megatron-Bridge's LoRA has one dim "
                          "and alpha")
    dim, scale = dims.pop(), scales.pop()
    alpha = scale * dim  # Megatron-Bridge scales by alpha / dim (rsLoRA's alpha / sqrt(r) becomes alpha * sqrt(r))
    meta = {"family": family.name, "dim": dim, "alpha": int(alpha) if float(alpha).is_integer() else alpha, "tp": tp,
            "peft_config": json.dumps(config, sort_keys=True)}

    files = []
    for t in range(tp):
        entries = []  # (name, dtype, shape, copies)
        for m in modules:
            for tensor, name, along_rows in ((m.a, "linear_in.weight", m.row_parallel is False),
                                             (m.b, "linear_out.weight", True)):
                rows, cols = view2d(tensor.shape)
                row0, col0, r, c = _split(rows, cols, tp, along_rows, f"{m.hf_module} ({name})")[t]
                entries.append((m.megatron_prefix + name, tensor.dtype, (r, c),
                                copies_for_region(tensor, row0, col0, r, c)))
        model = OrderedDict((name, TensorSlot(dtype, shape)) for name, dtype, shape, _ in entries)
        layout, slots = layout_torch_save({"model": model, "checkpoint_version": CHECKPOINT_VERSION, "iteration": 0,
                                           META_KEY: meta})
        tensors = tuple(PlannedTensor(name, dtype, shape, offset, tuple(copies))
                        for (name, dtype, shape, copies), offset in zip(entries, layout.record_offsets))
        files.append(PlannedFile(f"{RELEASE}/mp_rank_{t:02d}/{CHECKPOINT_FILE}", layout.size, tensors, layout.literals))
    files.append(plan_text_file(TRACKER, RELEASE))
    return ReshardPlan(adapter.path, "peft", {"format": "megatron-lora", "tp": tp}, tuple(files),
                       (f"LoRA adapter {adapter.path}: {len(modules)} modules, dim {dim}, alpha {meta['alpha']}, "
                        f"as Megatron-Bridge's CanonicalLoRA at tp {tp}",), model_tensors=2 * len(modules))


def _rank_files(root: str) -> list[str]:
    directory = os.path.join(root, RELEASE)
    if not os.path.isdir(directory):
        raise FormatError(f"{root}: no {RELEASE}/ directory of adapter ranks")
    ranks = sorted(d for d in os.listdir(directory) if d.startswith("mp_rank_"))
    expected = [f"mp_rank_{t:02d}" for t in range(len(ranks))]
    if not ranks or ranks != expected:
        raise FormatError(f"{directory}: rank directories {ranks}, expected {expected or ['mp_rank_00']} (pp 1)")
    return [os.path.join(directory, d, CHECKPOINT_FILE) for d in ranks]


def plan_to_peft(root: str) -> ReshardPlan:
    """The plan writing a Megatron-Bridge-layout adapter (as plan_to_megatron writes it) back as a
    Hugging Face PEFT adapter: adapter_model.safetensors laid out as PEFT's save_file lays it out,
    and the adapter_config.json it came with."""
    from pyconv.io.safetensors import layout_like_save_file
    from pyconv.io.torchzip import TensorRef, read_torch_checkpoint

    root = os.path.abspath(root)
    paths = _rank_files(root)
    ranks = []
    for path in paths:
        obj = read_torch_checkpoint(path).obj
        if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict) or not isinstance(obj.get(META_KEY), dict):
            raise FormatError(f"{path}: not an adapter rank file (no 'model' and '{META_KEY}' entries)")
        ranks.append((path, obj))
    meta = ranks[0][1][META_KEY]
    if any(obj[META_KEY] != meta for _, obj in ranks) or meta.get("tp") != len(ranks):
        raise FormatError(f"{root}: the rank files disagree on the adapter ({META_KEY}) or their count")
    if not isinstance(meta.get("family"), str) or not isinstance(meta.get("peft_config"), str):
        raise FormatError(f"{paths[0]}: '{META_KEY}' names no family or PEFT config")
    try:
        family = get_family(meta["family"])
        config = json.loads(meta["peft_config"])
    except (LayoutError, ValueError) as e:
        raise FormatError(f"{paths[0]}: '{META_KEY}': {e}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise FormatError(f"{paths[0]}: '{META_KEY}' carries no LORA adapter config")
    names = list(ranks[0][1]["model"])
    for path, obj in ranks:
        if list(obj["model"]) != names or not all(type(v) is TensorRef for v in obj["model"].values()):
            raise FormatError(f"{path}: holds other adapter tensors than {paths[0]}")
        for name in names:
            if ".adapter." not in name or not name.endswith((".linear_in.weight", ".linear_out.weight")) \
                    or len(obj["model"][name].shape) != 2:
                raise FormatError(f"{path}: '{name}' is not a 2-D Megatron-Bridge LoRA factor "
                                  "(<linear>.adapter.[adapter_x.]linear_in|linear_out.weight)")

    # Megatron-Bridge adapter prefix -> HF module, by the family table, as the forward direction names them.
    by_prefix = {}
    for name in names:
        prefix = name.rsplit("linear_", 1)[0]
        if prefix in by_prefix:
            continue
        base = prefix[:-len("adapter.")] if prefix.endswith(".adapter.") else prefix.rsplit(".adapter.", 1)[0] + "."
        found = family.match_megatron(base + "weight")
        if found is None:
            raise FormatError(f"{paths[0]}: adapter {prefix} is on {base}weight, not a weight of the {family.name} family")
        mapping, layer, _ = found
        sub = prefix.rsplit(".adapter.", 1)[1].rstrip(".")
        subs = SUB_ADAPTERS.get(mapping.rule.name, ())
        if (sub not in subs) if sub else subs:
            raise FormatError(f"{paths[0]}: adapter {prefix} does not fit {base}weight (expected "
                              f"{', '.join(subs) or 'one adapter, no sub-adapters'})")
        index = subs.index(sub) if sub else 0
        by_prefix[prefix] = (mapping.hf[index].replace("*", str(layer))[:-len(".weight")], mapping.rule.name == ROW.name)

    for prefix in by_prefix:
        missing = [p for p in ("linear_in.weight", "linear_out.weight") if prefix + p not in names]
        if missing:
            raise FormatError(f"{paths[0]}: adapter {prefix} has no {missing[0]}")
    tp = len(ranks)
    tensors: dict[str, CanonicalTensor] = {}
    for prefix, (module, row_parallel) in by_prefix.items():
        for part, hf_part, along_rows in (("linear_in.weight", "lora_A.weight", not row_parallel),
                                          ("linear_out.weight", "lora_B.weight", True)):
            shards = [obj["model"][prefix + part].stored() for _, obj in ranks]
            if any(s.shape != shards[0].shape or s.dtype != shards[0].dtype for s in shards):
                raise FormatError(f"{root}: the ranks' {prefix}{part} differ in shape or dtype "
                                  f"({', '.join(f'{s.dtype} {list(s.shape)}' for s in shards)})")
            rows, cols = view2d(shards[0].shape)
            blocks = tuple(SourceBlock(s, 0, 0, rows, cols, t * rows if along_rows else 0, 0 if along_rows else t * cols)
                           for t, s in enumerate(shards))
            shape = (rows * tp, cols) if along_rows else (rows, cols * tp)
            name = f"{PEFT_PREFIX}{module}.{hf_part}"
            tensors[name] = CanonicalTensor.assembled(name, shards[0].dtype, shape, blocks, root, "ranks")
    # PEFT's save_pretrained: safetensors' save_file with metadata {"format": "pt"}
    header, entries = layout_like_save_file([(n, t.dtype, t.shape) for n, t in tensors.items()], {"format": "pt"})
    planned = []
    for name, dtype, shape, begin, _ in entries:
        rows, cols = view2d(shape)
        planned.append(PlannedTensor(name, dtype, shape, len(header) + begin,
                                     tuple(copies_for_region(tensors[name], 0, 0, rows, cols))))
    size = len(header) + (entries[-1][4] if entries else 0)
    files = (PlannedFile("adapter_model.safetensors", size, tuple(planned), ((0, header),)),
             plan_text_file(CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True) + "\n"))
    return ReshardPlan(root, "megatron-lora", {"format": "peft"}, files,
                       (f"LoRA adapter of {len(by_prefix)} modules from {tp} ranks",), model_tensors=len(tensors))


def convert_adapter(src, dst, *, to: str, base=None, tp: int = 1, force: bool = False, threads: int = 4) -> ReshardPlan:
    """Writes a LoRA adapter in another layout: to="megatron" (a PEFT adapter directory; base, the
    model it adapts, names the family) or to="peft" (a Megatron-Bridge-layout adapter)."""
    from pyconv.execute import execute_plan

    src, dst = os.fspath(src), os.fspath(dst)
    if to == "megatron":
        if base is None:
            raise LayoutError("converting an adapter to Megatron's layout needs the base model (base=...)")
        plan = plan_to_megatron(src, os.fspath(base), tp)
    elif to == "peft":
        plan = plan_to_peft(src)
    else:
        raise LayoutError(f"an adapter converts to 'megatron' or 'peft', not {to!r}")
    if os.path.lexists(dst) and not force:
        raise OutputError(f"{dst}: destination exists (replacing it takes force)")
    execute_plan(plan, dst, force=force, threads=threads)
    return plan
