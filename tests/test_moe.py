"""Mixture-of-experts families through Megatron with expert parallelism: round trips judged by
the safetensors library and transformers."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
import transformers

import pyconv
from conftest import load_hf_tensors as hf_tensors
from pyconv.errors import LayoutError

CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        num_experts=4, num_experts_per_tok=2, max_position_embeddings=64),
}


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    out = {}
    for name, config in CONFIGS.items():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config()).eval()
        model.save_pretrained(root / name)
        out[name] = (model, str(root / name))
    return out




@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 2), (4, 1)])
@pytest.mark.parametrize("ep", [1, 2, 4])
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_moe_round_trip_through_every_layout(moe_models, tmp_path, family, tp, pp, ep):
    _, src = moe_models[family]
    pyconv.reshard(src, tmp_path / "meg", to="megatron", tp=tp, pp=pp, ep=ep)
    ranks = sorted(os.listdir(tmp_path / "meg" / "release"))
    assert len(ranks) == tp * pp * ep
    suffix = (f"_{pp - 1:03d}" if pp > 1 else "") + (f"_{ep - 1:03d}" if ep > 1 else "")
    assert ranks[-1] == f"mp_rank_{tp - 1:02d}{suffix}"
    last = torch.load(tmp_path / "meg" / "release" / ranks[-1] / "model_optim_rng.pt", weights_only=False)
    experts = {k.split(".local_experts.")[1].split(".")[0] for k in last["model"] if ".local_experts." in k}
    assert experts == {str(j) for j in range(4 // ep)}  # local expert indices
    assert last["args"].expert_model_parallel_size == ep and last["args"].num_experts == 4
    pyconv.reshard(tmp_path / "meg", tmp_path / "back", to="hf")
    source, output = hf_tensors(src), hf_tensors(tmp_path / "back")
    assert source.keys() == output.keys()
    assert all(torch.equal(source[k], output[k]) for k in source)


def test_expert_placement_on_ep_ranks(moe_models, tmp_path):
    """Expert e lives on EP rank e // (E/ep) as local expert e % (E/ep)."""
    _, src = moe_models["mixtral"]
    pyconv.reshard(src, tmp_path / "meg", to="megatron", ep=2, megatron_naming="local")
    source = hf_tensors(src)
    for ep_rank in range(2):
        model = torch.load(tmp_path / "meg" / "release" / f"mp_rank_00_{ep_rank:03d}" / "model_optim_rng.pt",
                           weights_only=False)["model"]
        for local in range(2):
            expert = ep_rank * 2 + local
            fc2 = model[f"decoder.layers.1.mlp.experts.local_experts.{local}.linear_fc2.weight"]
            assert torch.equal(fc2, source[f"model.layers.1.block_sparse_moe.experts.{expert}.w2.weight"])
            fc1 = model[f"decoder.layers.1.mlp.experts.local_experts.{local}.linear_fc1.weight"]
            assert torch.equal(fc1, torch.cat([source[f"model.layers.1.block_sparse_moe.experts.{expert}.w1.weight"],
                                               source[f"model.layers.1.block_sparse_moe.experts.{expert}.w3.weight"]]))
        # Non-expert tensors are on every EP rank; a MoE layer keeps pre_mlp_layernorm under both namings.
        assert "decoder.layers.1.pre_mlp_layernorm.weight" in model and "decoder.layers.1.mlp.router.weight" in model


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_transformers_logits_after_moe_round_trip(moe_models, tmp_path, family):
    model, src = moe_models[family]
    pyconv.reshard(src, tmp_path / "meg", to="megatron", tp=2, pp=2, ep=2, megatron_naming="local")
    pyconv.reshard(tmp_path / "meg", tmp_path / "meg2", to="megatron", tp=1, ep=4)
    pyconv.reshard(tmp_path / "meg2", tmp_path / "back", to="hf")
    loaded, info = type(model).from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    x = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded.eval()(x).logits)


def test_grouped_gemm_expert_names_are_read(moe_models, tmp_path):
    _, src = moe_models["qwen2_moe"]
    pyconv.reshard(src, tmp_path / "meg", to="megatron", ep=2)
    for f in sorted((tmp_path / "meg" / "release").iterdir()):
        path = f / "model_optim_rng.pt"
        ckpt = torch.load(path, weights_only=False)
        renamed = type(ckpt["model"])()
        for k, v in ckpt["model"].items():
            if ".experts.local_experts." in k:  # ...experts.local_experts.J.linear_fc1.weight -> experts.linear_fc1.weightJ
                head, rest = k.split(".experts.local_experts.")
                j, tail = rest.split(".", 1)
                k = f"{head}.experts.{tail}{j}"
            renamed[k] = v
        ckpt["model"] = renamed
        torch.save(ckpt, path)
    pyconv.reshard(tmp_path / "meg", tmp_path / "back", to="hf")
    source, output = hf_tensors(src), hf_tensors(tmp_path / "back")
    assert source.keys() == output.keys() and all(torch.equal(source[k], output[k]) for k in source)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_grouped_gemm_names_are_written(moe_models, tmp_path, family):
    _, src = moe_models[family]
    pyconv.reshard(src, tmp_path / "meg", to="megatron", tp=2, ep=2, moe_grouped_gemm=True)
    ckpt = torch.load(tmp_path / "meg" / "release" / "mp_rank_01_001" / "model_optim_rng.pt", weights_only=False)
    assert "decoder.layers.0.mlp.experts.linear_fc1.weight1" in ckpt["model"]
    assert not any(".local_experts." in k for k in ckpt["model"]) and ckpt["args"].moe_grouped_gemm
    pyconv.reshard(tmp_path / "meg", tmp_path / "back", to="hf")
    assert pyconv.verify(src, tmp_path / "back").equal


def test_bad_expert_layouts(moe_models, tmp_path):
    _, src = moe_models["mixtral"]
    with pytest.raises(LayoutError, match="num_experts = 4 is not divisible by ep = 3"):
        pyconv.reshard(src, tmp_path / "x", to="megatron", ep=3)
    torch.manual_seed(0)
    dense = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(dense).save_pretrained(tmp_path / "dense")
    with pytest.raises(LayoutError, match="ep=2 needs a mixture-of-experts model"):
        pyconv.reshard(tmp_path / "dense", tmp_path / "y", to="megatron", ep=2)


# ---- expert tensor parallelism ------------------------------------------------------------------

def _megatron_saving_ranks(tp: int, ep: int, etp: int, dp_factor: int = 1):
    """(TP rank, EP rank, expert-TP rank) of the ranks that write a legacy checkpoint, computed
    with Megatron-Core's own RankGenerator (parallel_state.initialize_model_parallel builds the
    dense grid with tp, dp and the expert grid with etp, ep, edp, both in order tp-cp-ep-dp-pp),
    and Megatron-LM's save condition (checkpointing.save_checkpoint: expert-data-parallel rank 0)."""
    import math

    from megatron.core.parallel_state import RankGenerator

    world = math.lcm(tp, etp * ep) * dp_factor
    order = "tp-cp-ep-dp-pp"
    dense = RankGenerator(tp=tp, ep=1, dp=world // tp, pp=1, cp=1, order=order)
    expert = RankGenerator(tp=etp, ep=ep, dp=world // (etp * ep), pp=1, cp=1, order=order)

    def rank_in(groups, r):
        return next(g.index(r) for g in groups if r in g)

    out = []
    for r in range(world):
        if rank_in(expert.get_ranks("dp"), r) == 0:
            out.append((rank_in(dense.get_ranks("tp"), r), rank_in(expert.get_ranks("ep"), r),
                        rank_in(expert.get_ranks("tp"), r)))
    return out


@pytest.mark.parametrize("tp, ep, etp", [(2, 2, 1), (4, 2, 2), (2, 4, 1), (2, 2, 2), (4, 4, 1)])
def test_expert_tensor_parallel_files_follow_megatron(moe_models, tmp_path, tp, ep, etp):
    """Which directory holds which dense and expert shard, checked against Megatron's own rank
    grids; then the round trip is bitwise."""
    pytest.importorskip("megatron.core")
    _, src = moe_models["mixtral"]
    pyconv.reshard(src, tmp_path / "meg", to="megatron", tp=tp, ep=ep, etp=etp, megatron_naming="local")
    expected = _megatron_saving_ranks(tp, ep, etp)
    assert expected == _megatron_saving_ranks(tp, ep, etp, dp_factor=2)  # the data-parallel size does not matter
    dirs = sorted(os.listdir(tmp_path / "meg" / "release"))
    assert dirs == sorted(f"mp_rank_{t:02d}_{e:03d}" for t, e, _ in expected)
    source = hf_tensors(src)
    per_rank = 4 // ep
    for t, e, et in expected:
        ckpt = torch.load(tmp_path / "meg" / "release" / f"mp_rank_{t:02d}_{e:03d}" / "model_optim_rng.pt",
                          weights_only=False)
        model = ckpt["model"]
        assert ckpt["args"].expert_tensor_parallel_size == etp
        o = model["decoder.layers.1.self_attention.linear_proj.weight"]  # dense: TP rank t
        assert torch.equal(o, source["model.layers.1.self_attn.o_proj.weight"].chunk(tp, 1)[t])
        for j in range(per_rank):  # experts: EP rank e, expert-TP rank et
            x = f"model.layers.1.block_sparse_moe.experts.{e * per_rank + j}."
            fc1 = model[f"decoder.layers.1.mlp.experts.local_experts.{j}.linear_fc1.weight"]
            assert torch.equal(fc1, torch.cat([source[x + "w1.weight"].chunk(etp, 0)[et],
                                               source[x + "w3.weight"].chunk(etp, 0)[et]]))
            fc2 = model[f"decoder.layers.1.mlp.experts.local_experts.{j}.linear_fc2.weight"]
            assert torch.equal(fc2, source[x + "w2.weight"].chunk(etp, 1)[et])
    pyconv.reshard(tmp_path / "meg", tmp_path / "back", to="hf")
    output = hf_tensors(tmp_path / "back")
    assert source.keys() == output.keys() and all(torch.equal(source[k], output[k]) for k in source)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_etp1_tp2_ep2_round_trip_is_bitwise(moe_models, tmp_path, family):
    _, src = moe_models[family]
    pyconv.reshard(src, tmp_path / "meg", to="megatron", tp=2, ep=2, etp=1)
    assert sorted(os.listdir(tmp_path / "meg" / "release")) == ["mp_rank_00_000", "mp_rank_01_001"]
    pyconv.reshard(tmp_path / "meg", tmp_path / "meg2", to="megatron", tp=1, pp=2, ep=4)  # etp = tp
    pyconv.reshard(tmp_path / "meg2", tmp_path / "back", to="hf")
    source, output = hf_tensors(src), hf_tensors(tmp_path / "back")
    assert source.keys() == output.keys() and all(torch.equal(source[k], output[k]) for k in source)


def test_bad_expert_tensor_parallel_layouts(moe_models, tmp_path):
    _, src = moe_models["mixtral"]
    with pytest.raises(LayoutError, match=r"etp=1 x ep=2 < tp=4: .* TP ranks 2..3"):
        pyconv.reshard(src, tmp_path / "a", to="megatron", tp=4, ep=2, etp=1)
    with pytest.raises(LayoutError, match="tp = 2 is not divisible by etp = 4"):
        pyconv.reshard(src, tmp_path / "b", to="megatron", tp=2, ep=2, etp=4)
    pyconv.reshard(src, tmp_path / "c", to="megatron", tp=2, ep=2, etp=1)
    release = tmp_path / "c" / "release"
    shutil.copytree(release / "mp_rank_00_000", release / "mp_rank_01_000")
    with pytest.raises(pyconv.FormatError, match="mp_rank_01_000 does not belong to a checkpoint with tp=2, pp=1, "
                                                 "ep=2, etp=1"):
        pyconv.open(tmp_path / "c")
    shutil.rmtree(release / "mp_rank_01_000")
    for d in release.iterdir():  # args that claim etp = tp: then every (TP, EP) pair must be there
        ckpt = torch.load(d / "model_optim_rng.pt", weights_only=False)
        ckpt["args"].expert_tensor_parallel_size = 2
        torch.save(ckpt, d / "model_optim_rng.pt")
    with pytest.raises(pyconv.FormatError, match=r"mp_rank_01_000 is missing \(found tp=2, pp=1, ep=2\)"):
        pyconv.open(tmp_path / "c")
