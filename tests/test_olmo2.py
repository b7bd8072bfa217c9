"""OLMo 2 (#17): norms after the attention and the MLP (none before), q/k RMSNorms over the whole
projection. Judged by transformers (no missing or unexpected keys, the same logits, the same
config) and by Megatron-Core running Megatron-Bridge's post-norm layer (EXAONE 4.0's) with the
whole-projection q/k norms of its OLMoE attention (tests/bridge_layers.py), built from the HF config
on its own, loading pyconv's output strictly. Those layers are the model at tp 1 only: a larger tp
is refused by name."""

from __future__ import annotations

import pytest
import torch
import transformers

import megatron_harness as mh
import pyconv
from conftest import (
    config_json, forget_hf_config, hf_logits, nontrivial_vectors, round_trip, save_tiny_model, with_config,
)
from pyconv.errors import LayoutError

ATOL = 1e-5


@pytest.fixture(scope="module")
def olmo2(tmp_path_factory):
    torch.manual_seed(5)
    config = transformers.Olmo2Config(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-6)
    model = nontrivial_vectors(transformers.Olmo2ForCausalLM(config)).eval()
    return model, save_tiny_model(model, tmp_path_factory.mktemp("olmo2") / "src")


def _ids(model):
    return torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))


def _load(path):
    model, info = transformers.Olmo2ForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


@pytest.mark.parametrize("to, options", [("megatron", {}), ("megatron", {"pp": 2}),
                                         ("megatron", {"pp": 2, "vpp": 2, "megatron_naming": "local"}),
                                         ("torch_dist", {})])
def test_round_trip_is_bitwise_and_transformers_agrees(olmo2, tmp_path, to, options):
    model, src = olmo2
    back = round_trip(src, tmp_path, to, **options)
    assert torch.equal(hf_logits(_load(back), _ids(model)), hf_logits(model, _ids(model)))


def test_megatron_core_runs_it_with_transformers_logits(olmo2, tmp_path):
    model, src = olmo2
    pyconv.reshard(src, tmp_path / "meg", to="megatron", megatron_naming="local")
    got = mh.megatron_logits(tmp_path / "meg", config_json(src), 1, _ids(model))
    assert (got - hf_logits(model, _ids(model))).abs().max().item() < ATOL


def test_names_and_shapes(olmo2, tmp_path):
    """EXAONE 4.0's post-norm names (no norm fused into linear_qkv / linear_fc1) and OLMoE's
    whole-projection q/k norms, Megatron-Bridge @067f987d."""
    model, src = olmo2
    pyconv.reshard(src, tmp_path / "meg", to="megatron")
    state = torch.load(tmp_path / "meg" / "release" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)
    got = {k: tuple(v.shape) for k, v in state["model"].items() if not k.endswith("_extra_state")}
    layer = {"self_attention.linear_qkv.weight": (4 * 16 + 2 * 2 * 16, 64),
             "self_attention.q_layernorm.weight": (64,), "self_attention.k_layernorm.weight": (32,),
             "self_attention.linear_proj.weight": (64, 64), "self_attention.linear_proj.post_layernorm.weight": (64,),
             "mlp.linear_fc1.weight": (192, 64), "mlp.linear_fc2.weight": (64, 96),
             "mlp.linear_fc2.post_layernorm.weight": (64,)}
    want = {"embedding.word_embeddings.weight": (128, 64), "decoder.final_layernorm.weight": (64,),
            "output_layer.weight": (128, 64)}
    for i in range(4):
        want.update({f"decoder.layers.{i}.{k}": shape for k, shape in layer.items()})
    assert got == want
    args = vars(state["args"])
    assert (args["qk_layernorm"], args["qk_layernorm_whole_projection"], args["post_layernorm"]) == (True, True, True)


@pytest.mark.parametrize("to", ["megatron", "torch_dist"])
def test_tp_above_one_is_refused_by_name(olmo2, tmp_path, to):
    with pytest.raises(LayoutError, match="tp=2: OLMo 2's q/k norms over the whole projection"):
        pyconv.reshard(olmo2[1], tmp_path / "out", to=to, tp=2)
    assert not (tmp_path / "out").exists()


def test_megatron_to_hf_from_the_args_alone(olmo2, tmp_path):
    """Without the HF config in the args: post_layernorm tells OLMo 2 from Qwen3 (the same
    qk_layernorm SwiGLU args otherwise)."""
    model, src = olmo2
    pyconv.reshard(src, tmp_path / "meg", to="megatron")
    forget_hf_config(tmp_path / "meg")
    pyconv.reshard(tmp_path / "meg", tmp_path / "hf", to="hf")
    assert config_json(tmp_path / "hf")["architectures"] == ["Olmo2ForCausalLM"]
    assert torch.equal(hf_logits(_load(tmp_path / "hf"), _ids(model)), hf_logits(model, _ids(model)))


def test_attention_bias_is_refused(olmo2, tmp_path):
    src = with_config(olmo2[1], tmp_path / "src", attention_bias=True)
    with pytest.raises(LayoutError, match="OLMo 2 with attention_bias"):
        pyconv.reshard(src, tmp_path / "meg", to="megatron")
