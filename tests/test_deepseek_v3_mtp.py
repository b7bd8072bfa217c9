"""DeepSeek-V3's multi-token-prediction (MTP) layer through Megatron, .pt and torch_dist: HF layer
num_hidden_layers (`enorm`, `hnorm`, `eh_proj`, a decoder layer, `shared_head.norm`, copies of the
embedding and the head) <-> Megatron-Core's `mtp.layers.0.*` on the last pipeline stage, which also
carries a copy of the embedding when it is not the first; in torch_dist keyed per MTP layer with
the routed experts on an expert axis.

Judges: Megatron-Core 0.16 builds a GPTModel with its MTP block (local spec, CPU) and loads
pyconv's output strictly (.pt: load_state_dict; torch_dist: dist_checkpointing.load), its logits
equal to transformers'; checkpoints Megatron-Core's own MTP model saved (.pt and torch_dist)
convert to the exact HF tensors; round trips are bitwise."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import megatron_harness as mh
import pyconv
from conftest import example_input
from conftest import load_hf_tensors as hf_tensors
from test_deepseek_v3_megatron import _build, _rank

needs_megatron = pytest.mark.skipif(not mh.megatron_available(), reason="megatron-core is not installed")
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning:megatron"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning:megatron")]
ATOL = 1e-5
LAYERS, HIDDEN = 3, 64  # test_deepseek_v3_megatron's tiny model; its MTP layer is HF layer 3
MTP = f"model.layers.{LAYERS}."


@pytest.fixture(scope="module")
def with_mtp(tmp_path_factory):
    """(model, dir): the q_lora tiny DeepSeek-V3 plus a full MTP layer, as DeepSeek ships layer 61:
    a MoE decoder layer with its own weights, the MTP norms and projection, and copies of the
    embedding and head."""
    root = tmp_path_factory.mktemp("deepseek_v3_mtp")
    model, src = _build("q_lora", root / "base", seed=3)
    tensors = hf_tensors(src)
    g = torch.Generator().manual_seed(4)
    mtp = {name.replace(f"model.layers.{LAYERS - 1}.", MTP): t + 0.01 * torch.randn(t.shape, generator=g)
           for name, t in tensors.items() if name.startswith(f"model.layers.{LAYERS - 1}.")}
    for leaf, shape in (("enorm.weight", (HIDDEN,)), ("hnorm.weight", (HIDDEN,)),
                        ("eh_proj.weight", (HIDDEN, 2 * HIDDEN)), ("shared_head.norm.weight", (HIDDEN,))):
        mtp[MTP + leaf] = torch.randn(shape, generator=g)
    mtp[MTP + "embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    mtp[MTP + "shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    out = root / "mtp"
    out.mkdir()
    save_file({**tensors, **mtp}, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((root / "base" / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    return model, out


def _assert_same(a, b):
    ta, tb = hf_tensors(a), hf_tensors(b)
    assert ta.keys() == tb.keys()
    assert [k for k in ta if not torch.equal(ta[k], tb[k])] == []


@pytest.mark.parametrize("tp,pp,ep,etp,naming", [(1, 1, 1, None, "te"), (2, 3, 2, None, "local"),
                                                 (2, 1, 2, 1, "te")])
def test_round_trip_keeps_the_mtp_layer(with_mtp, tmp_path, tp, pp, ep, etp, naming):
    _, src = with_mtp
    report = pyconv.reshard(src, tmp_path / "meg", to="megatron", tp=tp, pp=pp, ep=ep, etp=etp,
                            megatron_naming=naming)
    assert report.plan.notes == ()
    last = _rank(tmp_path / "meg", "mp_rank_00" + (f"_{pp - 1:03d}" if pp > 1 else "") + ("_000" if ep > 1 else ""))
    model = last["model"]
    assert last["args"].mtp_num_layers == 1
    assert ("embedding.word_embeddings.weight" in model) and "mtp.layers.0.eh_proj.weight" in model
    assert model["mtp.layers.0.eh_proj.weight"].shape == (HIDDEN // tp, 2 * HIDDEN)  # column parallel
    names = list(model)
    assert names.index("decoder.final_layernorm.weight") < names.index("mtp.layers.0.enorm.weight") \
        < names.index("mtp.layers.0.transformer_layer.self_attention.linear_q_up_proj.weight") \
        < names.index("mtp.layers.0.final_layernorm.weight") < names.index("output_layer.weight")
    assert f"mtp.layers.0.transformer_layer.mlp.experts.local_experts.{8 // ep - 1}.linear_fc2.weight" in model
    pyconv.reshard(tmp_path / "meg", tmp_path / "back", to="hf")
    _assert_same(src, tmp_path / "back")
    assert json.loads((tmp_path / "back" / "config.json").read_text())["num_nextn_predict_layers"] == 1


def test_transformers_loads_the_result(with_mtp, tmp_path):
    import transformers

    model, src = with_mtp
    pyconv.reshard(src, tmp_path / "meg", to="megatron", tp=2)
    pyconv.reshard(tmp_path / "meg", tmp_path / "back", to="hf")
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not info["missing_keys"]
    assert info["unexpected_keys"] and all(k.startswith(MTP) for k in info["unexpected_keys"])  # not run by HF
    ids = example_input(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded.eval()(ids).logits)


def _mtp_gpt_model(cfg: dict):
    """Megatron-Core's GPTModel with one MTP layer (local spec, MLA), tp 1."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_mtp_block_spec
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    t = mh.translate_hf_config(cfg, 1)
    config = MLATransformerConfig(**t["transformer_config"], mtp_num_layers=1)
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm")
    for layer_spec in spec.layer_specs:
        layer_spec.submodules.self_attention.submodules.core_attention = mh.mla_dot_product_attention()
    mtp_spec = get_gpt_mtp_block_spec(config, spec.layer_specs[-1], use_transformer_engine=False)
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=t["padded_vocab_size"], pre_process=True,
                    post_process=True, parallel_output=False, mtp_block_spec=mtp_spec, **t["gpt_model"]).eval()


@needs_megatron
def test_megatron_core_loads_pyconv_output(with_mtp, tmp_path):
    model, src = with_mtp
    cfg = json.loads((src / "config.json").read_text())
    pyconv.reshard(src, tmp_path / "meg", to="megatron", megatron_naming="local")
    ids = example_input(model)
    with mh.megatron_parallel(1):
        mcore = _mtp_gpt_model(cfg)
        mh.load_megatron_checkpoint(mcore, tmp_path / "meg", 0)  # strict: every mtp.* name and shape
        hf = hf_tensors(src)
        assert torch.equal(mcore.mtp.layers[0].eh_proj.weight, hf[MTP + "eh_proj.weight"])
        assert torch.equal(mcore.mtp.layers[0].transformer_layer.self_attention.linear_q_down_proj.weight,
                           hf[MTP + "self_attn.q_a_proj.weight"])
        # Megatron-Core runs MTP only to compute its training loss (it needs labels): the main
        # model's logits, with the MTP block switched off for the forward pass
        mcore.mtp_process, mcore.config.mtp_num_layers = False, None
        got = mh.forward_logits(mcore, ids, cfg["vocab_size"])
    with torch.no_grad():
        assert (got - model(ids).logits).abs().max().item() < ATOL


@needs_megatron
def test_checkpoint_saved_by_megatron_core_with_mtp_converts_to_hf(with_mtp, tmp_path):
    """Megatron-Core's own MTP model, filled from HF by the harness's gather/split mapping (the MTP
    decoder layer as a fourth layer renamed into mtp.layers.0.transformer_layer), saved with its
    state_dict_for_save_checkpoint()."""
    import re

    _, src = with_mtp
    cfg = json.loads((src / "config.json").read_text())
    hf = hf_tensors(src)
    full = mh.megatron_full_tensors(hf, {**cfg, "num_hidden_layers": LAYERS + 1})
    full = mh.megatron_shard(full, {**cfg, "num_hidden_layers": LAYERS + 1}, 1, 0)
    for name in list(full):
        if name.startswith(f"decoder.layers.{LAYERS}."):
            full[name.replace(f"decoder.layers.{LAYERS}.", "mtp.layers.0.transformer_layer.")] = full.pop(name)
    for leaf, hf_leaf in (("enorm", "enorm"), ("hnorm", "hnorm"), ("eh_proj", "eh_proj"),
                          ("final_layernorm", "shared_head.norm")):
        full[f"mtp.layers.0.{leaf}.weight"] = hf[MTP + hf_leaf + ".weight"]
    with mh.megatron_parallel(1):
        mcore = _mtp_gpt_model(cfg)
        params = dict(mcore.named_parameters())
        params.update({n: b for n, b in mcore.named_buffers() if n in full})
        assert sorted(set(params) - set(full)) == [] and sorted(set(full) - set(params)) == []
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(full[name])
        args = mh.megatron_args(cfg, 1)
        args.mtp_num_layers = 1
        state = {"model": mcore.state_dict_for_save_checkpoint(), "args": args,
                 "checkpoint_version": mh.CHECKPOINT_VERSION, "iteration": 0}
    assert any(re.match(r"mtp\.layers\.0\.transformer_layer\.mlp\.experts", k) for k in state["model"])
    f = mh.checkpoint_file(tmp_path / "mg", 0)
    f.parent.mkdir(parents=True)
    torch.save(state, f)
    (tmp_path / "mg" / "latest_checkpointed_iteration.txt").write_text("release")
    pyconv.reshard(tmp_path / "mg", tmp_path / "hf", to="hf")
    out = hf_tensors(tmp_path / "hf")
    assert out.keys() == hf.keys()
    assert [k for k in hf if not torch.equal(out[k], hf[k])] == []


# ---- torch_dist: Megatron-Core keys the MTP layer per MTP layer, its routed experts on an axis ------

@needs_megatron
def test_megatron_core_torch_dist_with_mtp_both_ways(with_mtp, tmp_path):
    """Megatron-Core's dist_checkpointing saves its MTP model (filled from pyconv's .pt output, which
    the test above proves) and pyconv reads it to the exact HF tensors; Megatron-Core loads
    pyconv's torch_dist output into a NaN-filled MTP model and holds every HF tensor."""
    from megatron.core import dist_checkpointing

    _, src = with_mtp
    cfg = json.loads((src / "config.json").read_text())
    hf = hf_tensors(src)
    pyconv.reshard(src, tmp_path / "meg", to="megatron", megatron_naming="local")
    pyconv.reshard(src, tmp_path / "td", to="torch_dist", megatron_naming="local")
    with mh.megatron_parallel(1):
        mcore = _mtp_gpt_model(cfg)
        mh.load_megatron_checkpoint(mcore, tmp_path / "meg", 0)
        (tmp_path / "saved").mkdir()
        dist_checkpointing.save({"model": mcore.sharded_state_dict()}, str(tmp_path / "saved"))
        theirs = dist_checkpointing.load_tensors_metadata(str(tmp_path / "saved"))
        assert "mtp.layers.0.transformer_layer.mlp.experts.experts.linear_fc1.weight" in theirs
        ours = dist_checkpointing.load_tensors_metadata(str(tmp_path / "td" / "release"))
        assert {k: tuple(v.global_shape) for k, v in ours.items() if k.startswith("mtp.")} == \
            {k: tuple(v.global_shape) for k, v in theirs.items() if k.startswith("mtp.")}
        loaded = _mtp_gpt_model(cfg)
        with torch.no_grad():
            for p in loaded.parameters():
                p.fill_(float("nan"))
        state = dist_checkpointing.load({"model": loaded.sharded_state_dict()}, str(tmp_path / "td" / "release"))
        loaded.load_state_dict(state["model"], strict=True)
        assert torch.equal(loaded.mtp.layers[0].eh_proj.weight, hf[MTP + "eh_proj.weight"])
        assert torch.equal(loaded.mtp.layers[0].final_layernorm.weight, hf[MTP + "shared_head.norm.weight"])
        mine, reference = loaded.state_dict(), mcore.state_dict()
        assert [k for k in reference if hasattr(reference[k], "shape") and not torch.equal(mine[k], reference[k])] == []
    (tmp_path / "saved" / "config.json").write_text(json.dumps(cfg))
    pyconv.reshard(tmp_path / "saved", tmp_path / "hf", to="hf")
    out = hf_tensors(tmp_path / "hf")
    assert out.keys() == hf.keys() and [k for k in hf if not torch.equal(out[k], hf[k])] == []
    pyconv.reshard(tmp_path / "td", tmp_path / "hf2", to="hf")
    assert pyconv.verify(src, tmp_path / "hf2").equal


# ---- the MTP layer placed by a pipeline layout ('m') -------------------------------------------------

@pytest.mark.parametrize("layout,pp", [("Et|t|tm|L", 2), ("Et|tt|m|L", 2), ("Ettt|mL", 2)])
def test_pipeline_layout_places_the_mtp_layer(with_mtp, tmp_path, layout, pp):
    """The chunk holding 'm' holds mtp.layers.0 and, unless it is the first, a copy of the embedding;
    Megatron-Core's PipelineParallelLayerLayout puts the MTP layer in the same chunk."""
    from pyconv.layout import layout_mtp_chunk

    _, src = with_mtp
    pyconv.reshard(src, tmp_path / "meg", to="megatron", pp=pp, pipeline_layout=layout)
    chunk, _ = layout_mtp_chunk(layout)
    vpp = (layout.count("|") + 1) // pp
    holders = []
    for p in range(pp):
        saved = torch.load(mh.checkpoint_file(tmp_path / "meg", 0, p, pp), weights_only=False)
        for v in range(vpp):
            model = saved["model" if vpp == 1 else f"model{v}"]
            if "mtp.layers.0.eh_proj.weight" in model:
                holders.append(v * pp + p)
                assert "embedding.word_embeddings.weight" in model  # the model's own, or the MTP stage's copy
    assert holders == [chunk]
    if mh.megatron_available():
        mh.import_megatron_core()
        from megatron.core import parallel_state
        from megatron.core.transformer.enums import LayerType
        from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

        theirs = PipelineParallelLayerLayout(layout, pp)
        saved_vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
        parallel_state.set_virtual_pipeline_model_parallel_world_size(vpp if vpp > 1 else None)
        try:
            mtp_chunks = [v * pp + p for p in range(pp) for v in range(vpp)
                          if theirs.get_num_layers_to_build(LayerType.mtp, vp_stage=v, pp_rank=p)]
        finally:
            parallel_state.set_virtual_pipeline_model_parallel_world_size(saved_vpp)
        assert mtp_chunks == [chunk]
    pyconv.reshard(tmp_path / "meg", tmp_path / "back", to="hf")
    _assert_same(src, tmp_path / "back")


def test_pipeline_layout_and_mtp_count_must_agree(with_mtp, tmp_path):
    from pyconv.errors import LayoutError

    _, src = with_mtp
    with pytest.raises(LayoutError, match="places 0 MTP layer"):
        pyconv.reshard(src, tmp_path / "a", to="megatron", pp=2, pipeline_layout="Ett|tL")
    with pytest.raises(LayoutError, match="several stages"):
        pyconv.reshard(src, tmp_path / "b", to="megatron", pp=2, pipeline_layout="Etm|tmtL")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@needs_megatron
@pytest.mark.parametrize("pp,vpp,layout", [(3, 1, None), (3, 1, "Et|ttm|L")])
def test_megatron_core_runs_pyconv_mtp_output_pipelined(with_mtp, tmp_path, pp, vpp, layout):
    """Under torchrun, one process per pipeline rank: Megatron-Core builds each rank's chunks with
    the MTP block where it places it (the last stage, or the layout's 'm'), loads pyconv's files
    strictly (the MTP stage's embedding copy included) and, chained rank to rank, gives
    transformers' logits."""
    import megatron_vpp

    from pyconv.layout import layout_mtp_chunk

    model, src = with_mtp
    pyconv.reshard(src, tmp_path / "meg", to="megatron", pp=pp, pipeline_layout=layout, megatron_naming="local")
    ids = example_input(model)
    cfg = json.loads((src / "config.json").read_text())
    logits, held = megatron_vpp.vpp_logits(tmp_path / "meg", cfg, pp, vpp, ids, mtp=1,
                                           **({"layout": layout} if layout else {}))
    assert held == [pp * vpp - 1 if layout is None else layout_mtp_chunk(layout)[0]]
    with torch.no_grad():
        assert (logits - model(ids).logits).abs().max().item() < ATOL
