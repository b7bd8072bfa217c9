"""OLMoE (#18): pre-norm attention with q/k RMSNorms over the whole projection, a mixture of experts
in every layer (softmax over all experts, top k, not renormalised). Judged by transformers (no
missing or unexpected keys, the same logits, the same config) and by Megatron-Core running its
MoE layer with Megatron-Bridge's whole-projection q/k norms (tests/bridge_layers.py) at ep 1 and
ep 2. The whole-projection norm is the model at tp 1 only: larger tp refused by name."""

from __future__ import annotations

import pytest
import torch
import transformers

import megatron_harness as mh
import pyconv
from conftest import (
    config_json, forget_hf_config, hf_logits, load_hf_tensors, nontrivial_vectors, round_trip, save_tiny_model,
)
from pyconv.errors import LayoutError

ATOL = 1e-5


@pytest.fixture(scope="module")
def olmoe(tmp_path_factory):
    torch.manual_seed(8)
    config = transformers.OlmoeConfig(vocab_size=96, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, num_experts=8,
                                      num_experts_per_tok=2, max_position_embeddings=64, pad_token_id=0,
                                      bos_token_id=1, eos_token_id=2)
    model = nontrivial_vectors(transformers.OlmoeForCausalLM(config)).eval()
    return model, save_tiny_model(model, tmp_path_factory.mktemp("olmoe") / "src")


def _ids(model):
    return torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("to, options", [("megatron", {"pp": 2}), ("megatron", {"ep": 8}),
                                         ("megatron", {"ep": 2, "pp": 2, "megatron_naming": "local"}),
                                         ("torch_dist", {})])
def test_round_trip_is_bitwise_and_transformers_agrees(olmoe, tmp_path, to, options):
    model, src = olmoe
    back = round_trip(src, tmp_path, to, **options)
    loaded, info = transformers.OlmoeForCausalLM.from_pretrained(back, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(hf_logits(loaded.eval(), _ids(model)), hf_logits(model, _ids(model)))


def test_megatron_core_runs_it_with_transformers_logits(olmoe, tmp_path):
    model, src = olmoe
    runs = []
    for ep in (1, 2):
        pyconv.reshard(src, tmp_path / f"ep{ep}", to="megatron", megatron_naming="local", ep=ep)
        runs.append((tmp_path / f"ep{ep}", config_json(src), 1, ep, _ids(model)))
    want = hf_logits(model, _ids(model))
    for run, got in zip(runs, mh.megatron_logits_many(runs)):
        assert (got - want).abs().max().item() < ATOL, run[3]


def test_names_args_and_args_alone(olmoe, tmp_path):
    """Megatron-Bridge's OLMoE names (@067f987d, olmoe_bridge.py); without the HF config in the args
    the whole-projection q/k norms tell OLMoE from Qwen3-MoE."""
    model, src = olmoe
    pyconv.reshard(src, tmp_path / "meg", to="megatron")
    rank_file = tmp_path / "meg" / "release" / "mp_rank_00" / "model_optim_rng.pt"
    state = torch.load(rank_file, weights_only=False)
    shapes = {k: tuple(v.shape) for k, v in state["model"].items()}
    assert shapes["decoder.layers.0.self_attention.q_layernorm.weight"] == (64,)
    assert shapes["decoder.layers.0.self_attention.k_layernorm.weight"] == (32,)
    assert "decoder.layers.0.mlp.router.weight" in shapes and "decoder.layers.0.pre_mlp_layernorm.weight" in shapes
    args = vars(state["args"])
    assert (args["qk_layernorm_whole_projection"], args["moe_router_pre_softmax"], args["num_experts"]) == (
        True, True, 8)
    forget_hf_config(tmp_path / "meg")
    pyconv.reshard(tmp_path / "meg", tmp_path / "hf", to="hf")
    assert config_json(tmp_path / "hf")["architectures"] == ["OlmoeForCausalLM"]
    loaded = transformers.OlmoeForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert torch.equal(hf_logits(loaded, _ids(model)), hf_logits(model, _ids(model)))


def test_tp_above_one_is_refused_by_name(olmoe, tmp_path):
    with pytest.raises(LayoutError, match="tp=2: OLMoE's q/k norms over the whole projection"):
        pyconv.reshard(olmoe[1], tmp_path / "out", to="megatron", tp=2, ep=2)
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_megatron_core_saves_converts_back_exactly(olmoe, tmp_path):
    """Megatron-Core's own state_dict() of the model the harness builds (whole-projection q/k
    norms), saved, read by pyconv back to the exact HF tensors."""
    _, src = olmoe
    ckpt = mh.save_with_megatron(src, tmp_path / "mg", tp=1)
    pyconv.reshard(ckpt, tmp_path / "hf", to="hf", family="olmoe")
    got, want = load_hf_tensors(tmp_path / "hf"), load_hf_tensors(src)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
