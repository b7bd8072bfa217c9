"""Pipeline placements of Megatron checkpoints: interleaved (virtual) pipelines whose rank files
hold model0..model{V-1}, pipeline_model_parallel_layout strings, and the embedding/loss counted
as layers of the split (account_for_*_in_pipeline_split).

Judged by Megatron-Core: its own layer placement (get_transformer_layer_offset,
get_num_layers_to_build, PipelineParallelLayerLayout) equals pyconv's; Megatron-Core builds
each rank's chunks (GPTModel(vp_stage=v)), loads pyconv's output strictly and, running the chunks
in the interleaved order, gives transformers' logits; a checkpoint Megatron-Core's chunks saved
converts to the exact HF tensors. Round trips through every other layout are bitwise."""

from __future__ import annotations

import pytest
import torch

import megatron_harness as mh
import pyconv
from conftest import config_json as config_of
from conftest import example_input, hf_logits, load_hf_tensors
from pyconv.errors import FormatError, LayoutError
from pyconv.layout import virtual_stages

needs_megatron = pytest.mark.skipif(not mh.megatron_available(), reason="megatron-core is not installed")
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning:megatron"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning:megatron")]
ATOL = 1e-5


def assert_same_tensors(a, b):
    ta, tb = load_hf_tensors(a), load_hf_tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name


@needs_megatron
@pytest.mark.parametrize("num_layers,pp,vpp,first,last", [
    (8, 2, 2, None, None), (12, 2, 3, None, None), (12, 3, 2, None, None), (6, 2, 3, None, None),
    (6, 2, 2, 4, None), (6, 2, 2, None, 2), (10, 3, 2, 2, 4), (10, 3, 2, None, 2), (8, 3, 2, 4, None),
    # (pp 2 with both first and last set and vpp: Megatron-Core 0.16.1 divides by its zero middle stages)
])
def test_layer_placement_is_megatron_cores(num_layers, pp, vpp, first, last):
    mh.import_megatron_core()
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    config = TransformerConfig(num_layers=num_layers, hidden_size=16, num_attention_heads=2,
                               pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp,
                               num_layers_in_first_pipeline_stage=first, num_layers_in_last_pipeline_stage=last,
                               pipeline_dtype=torch.float32)
    chunks = virtual_stages(num_layers, pp, vpp, first, last)
    for p in range(pp):
        for v in range(vpp):
            offset = get_transformer_layer_offset(config, vp_stage=v, pp_rank=p)
            count = get_num_layers_to_build(config, vp_stage=v, pp_rank=p)
            assert chunks[v * pp + p] == range(offset, offset + count), (p, v)


@needs_megatron
@pytest.mark.parametrize("family,pp,vpp,first,last", [
    ("llama", 2, 3, None, None),  # one layer per chunk, untied output layer on the last chunk
    ("qwen2", 2, 2, 4, None),     # uneven stages, tied embeddings (the last chunk carries a copy)
])
def test_megatron_core_runs_pyconv_vpp_output(tiny_models, tmp_path, family, pp, vpp, first, last):
    import megatron_vpp

    model, src = tiny_models[family]
    pyconv.reshard(src, tmp_path / "meg", to="megatron", pp=pp, vpp=vpp, first_stage_layers=first,
                   last_stage_layers=last, megatron_naming="local")
    ids = example_input(model)
    got = megatron_vpp.vpp_logits(tmp_path / "meg", config_of(src), pp, vpp, ids, first, last)
    assert (got - hf_logits(model, ids)).abs().max().item() < ATOL


@needs_megatron
def test_checkpoint_saved_by_megatron_core_chunks_converts_to_hf(tiny_models, tmp_path):
    import megatron_vpp

    model, src = tiny_models["llama"]
    ckpt = megatron_vpp.save_vpp_with_megatron(src, tmp_path / "mg", pp=2, vpp=3)
    info = pyconv.open(ckpt).summary()
    assert (info["pp"], info["vpp"]) == (2, 3)
    pyconv.reshard(ckpt, tmp_path / "hf", to="hf")
    out = load_hf_tensors(tmp_path / "hf")
    for name, tensor in model.state_dict().items():
        assert torch.equal(out[name], tensor), name
    # and pyconv writes those files itself: Megatron-Core's chunks and pyconv's hold the same tensors
    pyconv.reshard(src, tmp_path / "pyconv", to="megatron", pp=2, vpp=3, megatron_naming="local")
    for p in range(2):
        ours = torch.load(mh.checkpoint_file(tmp_path / "pyconv", 0, p, 2), weights_only=False)
        theirs = torch.load(mh.checkpoint_file(ckpt, 0, p, 2), weights_only=False)
        for v in range(3):
            a = {k: t for k, t in ours[f"model{v}"].items() if not k.endswith("_extra_state")}
            b = {k: t for k, t in theirs[f"model{v}"].items() if not k.endswith("_extra_state")}
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (p, v)


def test_round_trips(tiny_models, tmp_path):
    model, src = tiny_models["llama"]
    pyconv.reshard(src, tmp_path / "v", to="megatron", tp=2, pp=2, vpp=3, dtype="bf16")
    saved = torch.load(tmp_path / "v" / "release" / "mp_rank_01_001" / "model_optim_rng.pt", weights_only=False)
    assert [k for k in saved if k.startswith("model")] == ["model0", "model1", "model2"]
    assert saved["args"].virtual_pipeline_model_parallel_size == 3
    assert saved["args"].num_layers_per_virtual_pipeline_stage == 1
    assert "output_layer.weight" in saved["model2"] and "output_layer.weight" not in saved["model1"]
    pyconv.reshard(src, tmp_path / "bf16", to="hf", dtype="bf16")
    pyconv.reshard(tmp_path / "v", tmp_path / "hf", to="hf")
    assert_same_tensors(tmp_path / "hf", tmp_path / "bf16")
    # vpp -> another vpp and -> no vpp: the same files as converting from HF directly
    pyconv.reshard(tmp_path / "v", tmp_path / "v2", to="megatron", tp=1, pp=3, vpp=2)
    pyconv.reshard(tmp_path / "bf16", tmp_path / "v2-direct", to="megatron", tp=1, pp=3, vpp=2)
    pyconv.reshard(tmp_path / "v", tmp_path / "flat", to="megatron", tp=2, pp=2)
    pyconv.reshard(tmp_path / "bf16", tmp_path / "flat-direct", to="megatron", tp=2, pp=2)
    for a, b in (("v2", "v2-direct"), ("flat", "flat-direct")):
        files = sorted(p.relative_to(tmp_path / a) for p in (tmp_path / a).rglob("*.pt"))
        assert files and files == sorted(p.relative_to(tmp_path / b) for p in (tmp_path / b).rglob("*.pt"))
        for f in files:
            assert (tmp_path / a / f).read_bytes() == (tmp_path / b / f).read_bytes(), f


def test_cli_inspect_and_refusals(tiny_models, tmp_path, capsys):
    from pyconv.cli import main

    _, src = tiny_models["llama"]
    assert main(["reshard", str(src), str(tmp_path / "v"), "--to", "megatron", "--pp", "2", "--vpp", "3"]) == 0
    assert main(["inspect", str(tmp_path / "v")]) == 0
    assert "vpp:          3" in capsys.readouterr().out
    with pytest.raises(LayoutError, match="not divisible into vpp=2"):
        pyconv.reshard(src, tmp_path / "x", to="megatron", pp=2, vpp=2)  # 3 layers per rank
    with pytest.raises(LayoutError, match="needs pp > 1"):
        pyconv.reshard(src, tmp_path / "x", to="megatron", vpp=2)
    with pytest.raises(LayoutError, match="vpp does not apply to format 'hf'"):
        pyconv.reshard(src, tmp_path / "x", to="hf", vpp=2)
    assert main(["reshard", str(src), str(tmp_path / "x"), "--to", "megatron", "--pp", "2", "--vpp", "0"]) == 2
    assert not (tmp_path / "x").exists()


def _rewrite(path, edit):
    obj = torch.load(path, weights_only=False)
    edit(obj)
    torch.save(obj, path)


def test_hostile_chunks_are_named(tiny_models, tmp_path):
    _, src = tiny_models["llama"]
    pyconv.reshard(src, tmp_path / "v", to="megatron", pp=2, vpp=3)
    f = tmp_path / "v" / "release" / "mp_rank_00_001" / "model_optim_rng.pt"
    _rewrite(f, lambda o: o.pop("model1"))
    with pytest.raises(FormatError, match=r"mp_rank_00_001.*model0, model2 are not model0..model1"):
        pyconv.open(tmp_path / "v")
    pyconv.reshard(src, tmp_path / "w", to="megatron", pp=2, vpp=3)
    f = tmp_path / "w" / "release" / "mp_rank_00_001" / "model_optim_rng.pt"
    _rewrite(f, lambda o: o.pop("model2"))
    with pytest.raises(FormatError, match=r"mp_rank_00_001.*holds 2 model chunk\(s\).*holds 3"):
        pyconv.open(tmp_path / "w")
    pyconv.reshard(src, tmp_path / "a", to="megatron", pp=2, vpp=3)
    for p in range(2):
        f = tmp_path / "a" / "release" / f"mp_rank_00_00{p}" / "model_optim_rng.pt"
        _rewrite(f, lambda o: setattr(o["args"], "virtual_pipeline_model_parallel_size", 2))
    with pytest.raises(FormatError, match="virtual_pipeline_model_parallel_size=2 but the file holds 3"):
        pyconv.open(tmp_path / "a")
    pyconv.reshard(src, tmp_path / "s", to="megatron", pp=2, vpp=3)
    f = tmp_path / "s" / "release" / "mp_rank_00_000" / "model_optim_rng.pt"
    _rewrite(f, lambda o: o["model1"].update({"decoder.layers.1.mlp.linear_fc2.weight":
                                                 o["model1"]["decoder.layers.0.mlp.linear_fc2.weight"]}))
    with pytest.raises(FormatError, match=r"\[model1\].*decoder.layers.1.mlp.linear_fc2.weight.*model chunk 1"):
        pyconv.open(tmp_path / "s")
    for key, value, message in (
            ("account_for_embedding_in_pipeline_split", True, "7 layers|6 layers \\+ 1 embedding.*do not split evenly"),
            ("pipeline_model_parallel_layout", "Et|tL", "places 2 decoder layers, the model has 6"),
            ("pipeline_model_parallel_layout", "Etttt|tXL", "unknown layer character"),
            ("pipeline_model_parallel_layout", "tttE|tttL", "must open the first stage")):
        target = tmp_path / f"{key}-{len(message)}"
        pyconv.reshard(src, target, to="megatron", pp=2)
        for p in range(2):
            f = target / "release" / f"mp_rank_00_00{p}" / "model_optim_rng.pt"
            _rewrite(f, lambda o: setattr(o["args"], key, value))
        with pytest.raises(FormatError, match=message):
            pyconv.open(target)


LAYOUTS = [  # (pipeline_model_parallel_layout, pp, layers)
    ("Ettt|tttL", 2, 6), ("Et|tt|tt|tL", 2, 6), ("E|ttt|ttt|L", 2, 6), ("Et*3|(tt|)*2,tL", 2, 8),
    ("Ett|t|tt|tL", 4, 6), ("Et|(t|)*4tL", 3, 6),
]


@needs_megatron
@pytest.mark.parametrize("layout,pp,layers", LAYOUTS)
def test_pipeline_layout_placement_is_megatron_cores(layout, pp, layers):
    mh.import_megatron_core()
    from megatron.core import parallel_state
    from megatron.core.transformer.enums import LayerType
    from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

    from pyconv.layout import layout_stages

    theirs = PipelineParallelLayerLayout(layout, pp)
    theirs.validate_layer_layout(layers, None)
    ours, vpp = layout_stages(layout, layers, pp)
    assert vpp == theirs.virtual_pipeline_model_parallel_size
    saved = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    parallel_state.set_virtual_pipeline_model_parallel_world_size(vpp)
    try:
        for p in range(pp):
            for v in range(vpp):
                ids = theirs.get_layer_id_list(LayerType.decoder, vp_stage=v, pp_rank=p)
                assert list(ours[v * pp + p]) == ids, (p, v)
    finally:
        parallel_state.set_virtual_pipeline_model_parallel_world_size(saved)


@needs_megatron
@pytest.mark.parametrize("num_layers,pp,vpp,embedding,loss", [
    (7, 2, 1, True, False), (6, 2, 1, True, True), (7, 2, 1, False, True), (10, 4, 3, True, True),
    (11, 3, 2, True, False), (10, 2, 3, True, True),
])
def test_embedding_and_loss_slots_are_megatron_cores(num_layers, pp, vpp, embedding, loss):
    mh.import_megatron_core()
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from pyconv.layout import slot_stages

    config = TransformerConfig(num_layers=num_layers, hidden_size=16, num_attention_heads=2,
                               pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32,
                               virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
                               account_for_embedding_in_pipeline_split=embedding,
                               account_for_loss_in_pipeline_split=loss)
    ours = slot_stages(num_layers, pp, vpp, embedding, loss)
    for p in range(pp):
        for v in range(vpp):
            vp = v if vpp > 1 else None
            offset = get_transformer_layer_offset(config, vp_stage=vp, pp_rank=p)
            count = get_num_layers_to_build(config, vp_stage=vp, pp_rank=p)
            assert ours[v * pp + p] == range(offset, offset + count), (p, v)


@needs_megatron
@pytest.mark.parametrize("family,pp,vpp,placement", [
    ("llama", 2, 2, {"layout": "E|ttt|ttt|L"}),           # chunks holding only the embedding or the loss
    ("qwen2", 2, 1, {"account_embedding": True, "account_loss": True}),  # tied; 6 + 2 slots over 2 stages
])
def test_megatron_core_saved_layouts_convert_and_run(tiny_models, tmp_path, family, pp, vpp, placement):
    import megatron_vpp

    model, src = tiny_models[family]
    ckpt = megatron_vpp.save_vpp_with_megatron(src, tmp_path / "mg", pp, vpp, **placement)
    pyconv.reshard(ckpt, tmp_path / "hf", to="hf")
    out = load_hf_tensors(tmp_path / "hf")
    for name, tensor in model.state_dict().items():
        if name in out or not (family == "qwen2" and name == "lm_head.weight"):
            assert torch.equal(out[name], tensor), name
    if "layout" in placement:  # pyconv writes the same layout, and Megatron-Core runs it
        pyconv.reshard(src, tmp_path / "pyconv", to="megatron", pp=pp, pipeline_layout=placement["layout"],
                       megatron_naming="local")
        ids = example_input(model)
        got = megatron_vpp.vpp_logits(tmp_path / "pyconv", config_of(src), pp, vpp, ids, **placement)
        assert (got - hf_logits(model, ids)).abs().max().item() < ATOL
        saved = torch.load(mh.checkpoint_file(tmp_path / "pyconv", 0, 0, pp), weights_only=False)
        assert saved["args"].pipeline_model_parallel_layout == placement["layout"]
        assert not [k for k in saved["model0"] if k.startswith("decoder.layers.")]  # "E" alone


def test_pipeline_layout_refusals(tiny_models, tmp_path):
    _, src = tiny_models["llama"]
    with pytest.raises(LayoutError, match="places 5 decoder layers"):
        pyconv.reshard(src, tmp_path / "x", to="megatron", pp=2, pipeline_layout="Ettt|ttL")
    with pytest.raises(LayoutError, match="not a multiple of pp=2"):
        pyconv.reshard(src, tmp_path / "x", to="megatron", pp=2, pipeline_layout="Ett|tt|ttL")
    with pytest.raises(LayoutError, match="gives vpp=2, not 3"):
        pyconv.reshard(src, tmp_path / "x", to="megatron", pp=2, vpp=3, pipeline_layout="Et|tt|tt|tL")
    with pytest.raises(LayoutError, match="MTP"):
        pyconv.reshard(src, tmp_path / "x", to="megatron", pp=2, pipeline_layout="Ettt|tttmL")
    assert not (tmp_path / "x").exists()
