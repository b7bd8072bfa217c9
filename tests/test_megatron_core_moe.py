"""Megatron-Core as the judge of pyconv's mixture-of-experts output (Mixtral, Qwen2-MoE).

Megatron-Core (CPU, gloo; local spec with sequential experts, `allgather` token dispatcher) builds
the GPTModel that the HF config describes, loads pyconv's per-rank checkpoint with
`load_state_dict(strict=True)` and must give transformers' logits within 1e-5 (fp32): at tp=1, ep=1
in this process, at (tp=1, ep=2) and (tp=2, ep=1) under torchrun with two processes (all of those
in one torchrun start, the dominant cost). The other way round, a checkpoint written from
Megatron-Core's own MoE state_dict() converts to the HF tensors.
"""

from __future__ import annotations

import os

import pytest
import torch

import megatron_harness as mh
import pyconv
from conftest import load_hf_tensors as hf_tensors
from conftest import example_input

pytestmark = [
    pytest.mark.skipif(not mh.megatron_available(), reason="megatron-core is not installed"),
    pytest.mark.filterwarnings("ignore::UserWarning:megatron"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:megatron"),
]
ATOL = 1e-5
FAMILIES = ("mixtral", "qwen2_moe")
TORCHRUN_LAYOUTS = ((1, 2), (2, 1))  # (tp, ep), world size 2
MOE_FFN = {"mixtral": 96, "qwen2_moe": 32}  # each routed expert's intermediate size


def _config(family, **overrides):
    import transformers

    if family == "mixtral":
        return transformers.MixtralConfig(
            vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
            rope_theta=5000.0, **overrides)
    if family == "qwen2_moe":
        return transformers.Qwen2MoeConfig(
            vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
            shared_expert_intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            num_experts=4, num_experts_per_tok=2, max_position_embeddings=64, **overrides)
    raise ValueError(family)


def _build(family, path, seed, **overrides):
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_config(family, **overrides)).eval()
    with torch.no_grad():  # non-trivial norms and q/k/v biases, so that a mix-up cannot go unnoticed
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    model.save_pretrained(path, max_shard_size="60KB")
    return model, str(path)


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("megatron_core_moe")
    return {family: _build(family, root / family, seed) for seed, family in enumerate(FAMILIES)}


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()




def _rank_file(ckpt, name):
    return torch.load(ckpt / "release" / name / "model_optim_rng.pt", map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def torchrun_results(moe_models, tmp_path_factory):
    """One torchrun start (2 processes) for: Megatron-Core's logits on pyconv's output at every
    (tp, ep) of TORCHRUN_LAYOUTS for both families, and Megatron-Core's own checkpoints at ep=2."""
    root = tmp_path_factory.mktemp("megatron_core_moe_torchrun")
    runs, keys, saves = [], [], []
    for family in FAMILIES:
        model, src = moe_models[family]
        for tp, ep in TORCHRUN_LAYOUTS:
            out = root / f"{family}_tp{tp}_ep{ep}"
            pyconv.reshard(src, out, to="megatron", tp=tp, pp=1, ep=ep, megatron_naming="local")
            runs.append((out, src, tp, ep, example_input(model)))
            keys.append((family, tp, ep))
        saves.append((src, root / f"{family}_saved_by_megatron_ep2", 1, 2))
    logits = mh.megatron_logits_many(runs, saves=saves, timeout=240)
    return {"logits": {k: (run[0], lg) for k, run, lg in zip(keys, runs, logits)},
            "saved": {family: save[1] for family, save in zip(FAMILIES, saves)}}


def test_translate_moe_config(moe_models):
    mixtral = mh.translate_hf_config(moe_models["mixtral"][0].config, tp=2, ep=2)
    tc = mixtral["transformer_config"]
    assert mixtral["num_experts"] == tc["num_moe_experts"] == 4
    assert (tc["moe_ffn_hidden_size"], tc["moe_router_topk"], tc["num_query_groups"]) == (96, 2, 2)
    # softmax over all -> top-k -> renormalise == top-k on the logits -> softmax over the k
    assert tc["moe_router_pre_softmax"] is False and tc["moe_router_score_function"] == "softmax"
    assert tc["moe_router_load_balancing_type"] == "none" and tc["moe_token_dispatcher_type"] == "allgather"
    assert not tc["moe_grouped_gemm"] and tc["moe_shared_expert_intermediate_size"] is None
    assert (tc["expert_model_parallel_size"], tc["expert_tensor_parallel_size"]) == (2, 2)
    assert not tc["add_qkv_bias"] and not tc["add_bias_linear"]

    qwen = mh.translate_hf_config(moe_models["qwen2_moe"][0].config)["transformer_config"]
    assert (qwen["moe_ffn_hidden_size"], qwen["moe_shared_expert_intermediate_size"]) == (32, 48)
    assert qwen["moe_shared_expert_gate"] and qwen["add_qkv_bias"] and not qwen["add_bias_linear"]
    assert qwen["moe_router_pre_softmax"] is True  # norm_topk_prob=False: softmax over all, top-k, no renorm
    normed = mh.translate_hf_config(_config("qwen2_moe", norm_topk_prob=True))["transformer_config"]
    assert normed["moe_router_pre_softmax"] is False

    with pytest.raises(ValueError, match="not divisible by ep = 3"):
        mh.translate_hf_config(moe_models["mixtral"][0].config, ep=3)
    with pytest.raises(NotImplementedError, match="dense layers"):
        mh.translate_hf_config(_config("qwen2_moe", decoder_sparse_step=2))


@pytest.mark.parametrize("family", FAMILIES)
def test_megatron_core_loads_pyconv_moe_output_tp1_ep1(moe_models, tmp_path, family):
    model, src = moe_models[family]
    pyconv.reshard(src, tmp_path / "meg", to="megatron", tp=1, ep=1, megatron_naming="local")
    ids = example_input(model)
    got = mh.megatron_logits(tmp_path / "meg", src, 1, ids)  # load_state_dict(strict=True)
    assert got.shape == (2, 11, 96)
    assert (got - hf_logits(model, ids)).abs().max().item() < ATOL


@pytest.mark.parametrize("tp, ep", TORCHRUN_LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_megatron_core_loads_pyconv_moe_output_torchrun(moe_models, torchrun_results, family, tp, ep):
    model, _ = moe_models[family]
    ckpt, got = torchrun_results["logits"][(family, tp, ep)]
    suffixes = [f"mp_rank_{t:02d}" + (f"_{e:03d}" if ep > 1 else "") for t in range(tp) for e in range(ep)]
    assert sorted(os.listdir(ckpt / "release")) == suffixes
    last = _rank_file(ckpt, suffixes[-1])["model"]
    local = {k.split(".local_experts.")[1].split(".")[0] for k in last if ".local_experts." in k}
    assert local == {str(j) for j in range(4 // ep)}
    fc1 = last["decoder.layers.1.mlp.experts.local_experts.0.linear_fc1.weight"]
    assert fc1.shape == (2 * MOE_FFN[family] // tp, 64)  # [gate_r; up_r] of this TP rank
    assert (got - hf_logits(model, example_input(model))).abs().max().item() < ATOL


def test_strict_load_names_a_missing_expert(moe_models, tmp_path):
    model, src = moe_models["qwen2_moe"]
    pyconv.reshard(src, tmp_path / "meg", to="megatron", tp=1, megatron_naming="local")
    f = tmp_path / "meg" / "release" / "mp_rank_00" / "model_optim_rng.pt"
    ckpt = torch.load(f, weights_only=False)
    del ckpt["model"]["decoder.layers.1.mlp.experts.local_experts.3.linear_fc2.weight"]
    torch.save(ckpt, f)
    with pytest.raises(mh.StateDictMismatch, match=r"missing: \['decoder.layers.1.mlp.experts.local_experts.3"):
        mh.megatron_logits(tmp_path / "meg", src, 1, example_input(model))


def _moe_args(args) -> dict:
    return dict(add_qkv_bias=args.add_qkv_bias, num_experts=args.num_experts, moe_ffn_hidden_size=args.moe_ffn_hidden_size,
                moe_router_topk=args.moe_router_topk,
                moe_router_pre_softmax=getattr(args, "moe_router_pre_softmax", False),  # Megatron-LM defaults
                moe_router_score_function=getattr(args, "moe_router_score_function", "softmax"),
                moe_shared_expert_intermediate_size=getattr(args, "moe_shared_expert_intermediate_size", None),
                moe_shared_expert_gate=getattr(args, "moe_shared_expert_gate", False),
                expert_model_parallel_size=args.expert_model_parallel_size,
                expert_tensor_parallel_size=args.expert_tensor_parallel_size)


@pytest.mark.parametrize("family, overrides", [
    ("mixtral", {}),
    ("qwen2_moe", {}),
    ("qwen2_moe", {"norm_topk_prob": True}),  # renormalised top-k: moe_router_pre_softmax=False
    ("qwen2_moe", {"qkv_bias": False}),       # no q/k/v biases: add_qkv_bias=False
])
def test_pyconv_moe_args_describe_the_model_megatron_core_runs(tmp_path, family, overrides):
    """The args pyconv writes must give Megatron-LM the MoE settings that reproduce HF's forward
    (those of translate_hf_config, which the logits tests prove)."""
    _, src = _build(family, tmp_path / "hf", 0, **overrides)
    pyconv.reshard(src, tmp_path / "meg", to="megatron", tp=2, ep=2, megatron_naming="local")
    args = _rank_file(tmp_path / "meg", "mp_rank_01_001")["args"]
    want = mh.megatron_args(src, tp=2, ep=2)
    assert _moe_args(args) == _moe_args(want)


@pytest.mark.parametrize("ep", [1, 2])
@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_saved_by_megatron_core_moe_converts_to_hf(moe_models, torchrun_results, tmp_path, family, ep):
    model, src = moe_models[family]
    if ep == 1:
        ckpt = mh.save_with_megatron(src, tmp_path / "mg", tp=1)  # Megatron-Core's own state_dict()
    else:
        ckpt = torchrun_results["saved"][family]
        assert sorted(os.listdir(ckpt / "release")) == ["mp_rank_00_000", "mp_rank_00_001"]
    info = pyconv.open(ckpt).summary()
    assert (info["family"], info["tp"], info["pp"], info["ep"]) == (family, 1, 1, ep)
    pyconv.reshard(ckpt, tmp_path / "hf", to="hf")
    source, output = hf_tensors(src), hf_tensors(tmp_path / "hf")
    assert source.keys() == output.keys()
    assert all(torch.equal(source[k], output[k]) for k in source)
    loaded = type(model).from_pretrained(tmp_path / "hf").eval()
    ids = example_input(model)
    assert (hf_logits(loaded, ids) - hf_logits(model, ids)).abs().max().item() < ATOL
