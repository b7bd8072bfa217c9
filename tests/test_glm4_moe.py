"""GLM-4.5 (#18): q/k/v biases, per-head q/k norms, half the head dims rotated, a dense first layer,
DeepSeek-V3's routing (sigmoid scores with the correction bias, group-limited top-k, normalised
weights times routed_scaling_factor, a shared expert) and its multi-token-prediction layer.
Judged by transformers (no missing or unexpected keys, the same logits, the same config) and by
Megatron-Core (built from the HF config by the harness, strict load, logits within 1e-5) at tp 1,
tp 2 and ep 2."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import megatron_harness as mh
import pyconv
from conftest import (
    config_json, forget_hf_config, hf_logits, load_hf_tensors, nontrivial_vectors, round_trip, save_tiny_model,
    with_config,
)

ATOL = 1e-5


@pytest.fixture(scope="module")
def glm(tmp_path_factory):
    torch.manual_seed(7)
    config = transformers.Glm4MoeConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, routed_scaling_factor=2.5,
        max_position_embeddings=64, use_qk_norm=True, attention_bias=True, partial_rotary_factor=0.5,
        num_nextn_predict_layers=0, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = nontrivial_vectors(transformers.Glm4MoeForCausalLM(config)).eval()
    with torch.no_grad():  # a correction bias that changes which experts are chosen
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(8) * 0.5)
    return model, save_tiny_model(model, tmp_path_factory.mktemp("glm4_moe") / "src")


@pytest.fixture(scope="module")
def glm_mtp(glm, tmp_path_factory):
    """The model with an MTP layer as the released checkpoints store it (HF layer 4: a decoder
    layer, enorm, hnorm, eh_proj, shared_head.norm, and copies of the embedding and the head)."""
    from safetensors.torch import save_file

    _, src = glm
    root = tmp_path_factory.mktemp("glm4_moe_mtp")
    tensors = load_hf_tensors(src)
    g = torch.Generator().manual_seed(3)
    extra = {k.replace("model.layers.3.", "model.layers.4."): torch.randn(v.shape, generator=g)
             for k, v in tensors.items() if k.startswith("model.layers.3.")}
    extra.update({"model.layers.4.enorm.weight": torch.randn(64, generator=g),
                  "model.layers.4.hnorm.weight": torch.randn(64, generator=g),
                  "model.layers.4.eh_proj.weight": torch.randn(64, 128, generator=g),
                  "model.layers.4.shared_head.norm.weight": torch.randn(64, generator=g),
                  "model.layers.4.embed_tokens.weight": tensors["model.embed_tokens.weight"].clone(),
                  "model.layers.4.shared_head.head.weight": tensors["lm_head.weight"].clone()})
    save_file({**tensors, **extra}, str(root / "model.safetensors"), metadata={"format": "pt"})
    (root / "config.json").write_text(json.dumps({**config_json(src), "num_nextn_predict_layers": 1}))
    return str(root)


def _ids(model):
    return torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))


def _load(path):
    model, info = transformers.Glm4MoeForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


@pytest.mark.parametrize("to, options", [("megatron", {}), ("megatron", {"tp": 2, "pp": 2}),
                                         ("megatron", {"tp": 2, "ep": 2}), ("megatron", {"ep": 8, "etp": 1}),
                                         ("megatron", {"tp": 4, "ep": 2, "etp": 2, "megatron_naming": "local"}),
                                         ("torch_dist", {})])
def test_round_trip_is_bitwise_and_transformers_agrees(glm, tmp_path, to, options):
    model, src = glm
    back = round_trip(src, tmp_path, to, **options)
    assert torch.equal(hf_logits(_load(back), _ids(model)), hf_logits(model, _ids(model)))


def test_megatron_core_runs_it_with_transformers_logits(glm, tmp_path):
    model, src = glm
    runs = []
    for tp, ep in ((1, 1), (2, 1), (1, 2)):
        pyconv.reshard(src, tmp_path / f"tp{tp}ep{ep}", to="megatron", megatron_naming="local", tp=tp, ep=ep)
        runs.append((tmp_path / f"tp{tp}ep{ep}", config_json(src), tp, ep, _ids(model)))
    want = hf_logits(model, _ids(model))
    for run, got in zip(runs, mh.megatron_logits_many(runs)):
        assert (got - want).abs().max().item() < ATOL, run[2:4]


def test_names_and_args(glm, tmp_path):
    """Megatron-Bridge's GLM-4.5 names (@067f987d, glm45_bridge.py) and the args Megatron-Core needs."""
    _, src = glm
    pyconv.reshard(src, tmp_path / "meg", to="megatron")
    state = torch.load(tmp_path / "meg" / "release" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)
    names = set(state["model"])
    for name in ("decoder.layers.0.mlp.linear_fc1.layer_norm_weight", "decoder.layers.1.pre_mlp_layernorm.weight",
                 "decoder.layers.1.self_attention.linear_qkv.bias", "decoder.layers.1.self_attention.q_layernorm.weight",
                 "decoder.layers.1.mlp.router.weight", "decoder.layers.1.mlp.router.expert_bias",
                 "decoder.layers.1.mlp.experts.local_experts.7.linear_fc1.weight",
                 "decoder.layers.1.mlp.shared_experts.linear_fc1.weight"):
        assert name in names, name
    assert not any("decoder.layers.0.mlp.router" in n or "decoder.layers.1.mlp.linear_fc1.layer_norm" in n
                   for n in names)
    args = vars(state["args"])
    assert {k: args[k] for k in ("rotary_percent", "qk_layernorm", "add_qkv_bias", "add_bias_linear",
                                 "moe_router_score_function", "moe_router_enable_expert_bias",
                                 "moe_router_topk_scaling_factor", "moe_router_num_groups", "moe_router_group_topk",
                                 "moe_layer_freq", "moe_shared_expert_intermediate_size")} == {
        "rotary_percent": 0.5, "qk_layernorm": True, "add_qkv_bias": True, "add_bias_linear": False,
        "moe_router_score_function": "sigmoid", "moe_router_enable_expert_bias": True,
        "moe_router_topk_scaling_factor": 2.5, "moe_router_num_groups": 2, "moe_router_group_topk": 1,
        "moe_layer_freq": [0, 1, 1, 1], "moe_shared_expert_intermediate_size": 32}


@pytest.mark.parametrize("to, options", [("megatron", {"pp": 2}), ("megatron", {"tp": 2, "ep": 2}), ("torch_dist", {})])
def test_the_mtp_layer_travels_as_deepseek_v3s(glm_mtp, tmp_path, to, options):
    round_trip(glm_mtp, tmp_path, to, **options)
    if to == "megatron" and options.get("pp") == 2:
        last = torch.load(tmp_path / "mid" / "release" / "mp_rank_00_001" / "model_optim_rng.pt", weights_only=False)
        assert {"mtp.layers.0.eh_proj.weight", "mtp.layers.0.final_layernorm.weight",
                "mtp.layers.0.transformer_layer.mlp.router.expert_bias"} <= set(last["model"])
        assert vars(last["args"])["mtp_num_layers"] == 1


def test_megatron_to_hf_from_the_args_alone(glm, tmp_path):
    model, src = glm
    pyconv.reshard(src, tmp_path / "meg", to="megatron")
    forget_hf_config(tmp_path / "meg")
    pyconv.reshard(tmp_path / "meg", tmp_path / "hf", to="hf")
    assert config_json(tmp_path / "hf")["architectures"] == ["Glm4MoeForCausalLM"]
    assert torch.equal(hf_logits(_load(tmp_path / "hf"), _ids(model)), hf_logits(model, _ids(model)))


def test_a_cast_keeps_the_router_in_float32(glm, tmp_path):
    """transformers keeps gate.weight and e_score_correction_bias in float32 (its
    _keep_in_fp32_modules_strict); pyconv's bf16 output does too."""
    _, src = glm
    pyconv.reshard(src, tmp_path / "bf16", to="hf", dtype="bf16")
    got = load_hf_tensors(tmp_path / "bf16")
    assert got["model.layers.1.mlp.gate.weight"].dtype == torch.float32
    assert got["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert got["model.layers.1.mlp.experts.0.up_proj.weight"].dtype == torch.bfloat16


def test_routing_megatron_cannot_express_is_refused(glm, tmp_path):
    src = with_config(glm[1], tmp_path / "src", norm_topk_prob=False)
    with pytest.raises(pyconv.errors.LayoutError, match="norm_topk_prob is false"):
        pyconv.reshard(src, tmp_path / "meg", to="megatron")


def test_a_checkpoint_megatron_core_saves_converts_back_exactly(glm, tmp_path):
    """Megatron-Core's own GPTModel.state_dict() (harness: built from the HF config, weights set
    from the HF tensors by its own translation), saved per rank, read by pyconv back to HF: the
    exact HF tensors."""
    model, src = glm
    ckpt = mh.save_with_megatron(src, tmp_path / "mg", tp=1)
    pyconv.reshard(ckpt, tmp_path / "hf", to="hf", family="glm4_moe")
    got, want = load_hf_tensors(tmp_path / "hf"), load_hf_tensors(src)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
