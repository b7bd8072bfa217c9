"""Kimi K2 (#18): DeepSeek-V3's architecture (DeepseekV3ForCausalLM) with 384 routed experts, 8 of
them per token, one expert group, routed_scaling_factor 2.827, YaRN rope, and its own config.json
(model_type kimi_k2, the remote-code fields: topk_method, scoring_func, ep_size, auto_map...), at
tiny dimensions. End to end: HF -> Megatron (tp 2, ep 8; ep 384) -> HF and HF -> torch_dist -> HF bit
for bit with the config as it was, transformers' logits unchanged, and --to deepseek byte for byte
as DeepSeek's convert.py algorithm writes it."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import megatron_harness as mh
import pyconv
from conftest import TOKENIZER_FILES, forget_hf_config, hf_logits, round_trip, with_config
from test_deepseek import assert_same_directory, reference_convert

EXPERTS = 384
# Kimi-K2-Instruct's config.json fields beyond the dims (moonshotai/Kimi-K2-Instruct), tiny rope context.
KIMI_FIELDS = {
    "model_type": "kimi_k2", "architectures": ["DeepseekV3ForCausalLM"],
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                 "AutoModel": "modeling_deepseek.DeepseekV3Model",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
    "aux_loss_alpha": 0.001, "ep_size": 1, "moe_layer_freq": 1, "n_group": 1, "topk_group": 1,
    "norm_topk_prob": True, "num_experts_per_tok": 8, "routed_scaling_factor": 2.827, "scoring_func": "sigmoid",
    "seq_aux": True, "topk_method": "noaux_tc", "num_nextn_predict_layers": 0, "first_k_dense_replace": 1,
    "rope_scaling": {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4, "type": "yarn"},
    "rope_theta": 50000.0, "max_position_embeddings": 128, "tie_word_embeddings": False,
}


@pytest.fixture(scope="module")
def kimi(tmp_path_factory):
    torch.manual_seed(9)
    config = transformers.DeepseekV3Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=8, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=EXPERTS, n_shared_experts=1,
        num_experts_per_tok=8, first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=16, n_group=1, topk_group=1, routed_scaling_factor=2.827,
        max_position_embeddings=128, rope_parameters={**KIMI_FIELDS["rope_scaling"], "rope_type": "yarn",
                                                      "rope_theta": 50000.0})
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.dim() == 1 and ("norm" in name or "e_score_correction_bias" in name):
                t.copy_(torch.randn_like(t) * 0.1 + (1.0 if "norm" in name else 0.0))
    path = tmp_path_factory.mktemp("kimi_k2") / "hf"
    model.save_pretrained(path, max_shard_size="400KB")
    # The released config as Kimi writes it: its own model_type and remote-code fields, rope_scaling.
    saved = json.loads((path / "config.json").read_text())
    saved.pop("rope_parameters", None)
    (path / "config.json").write_text(json.dumps({**saved, **KIMI_FIELDS}, indent=2))
    for name, text in TOKENIZER_FILES.items():
        (path / name).write_text(text)
    return model, str(path)


def _ids():
    return torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(1))


def _logits(path):
    """transformers has no kimi_k2 model type (Kimi ships remote code): its DeepSeek-V3 config class
    reads the file, told the model type it is, so that its checkpoint conversion applies."""
    config = transformers.DeepseekV3Config.from_pretrained(path)
    config.model_type = "deepseek_v3"
    model, info = transformers.DeepseekV3ForCausalLM.from_pretrained(path, config=config, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return hf_logits(model.eval(), _ids())


def test_transformers_reads_the_kimi_config_as_the_model(kimi):
    model, path = kimi
    assert torch.equal(_logits(path), hf_logits(model, _ids()))


@pytest.mark.parametrize("to, options", [("megatron", {"tp": 2, "ep": 8}), ("megatron", {"ep": EXPERTS, "pp": 2}),
                                         ("torch_dist", {})])
def test_round_trip_keeps_every_byte_and_the_config(kimi, tmp_path, to, options):
    model, src = kimi
    back = round_trip(src, tmp_path, to, **options)
    assert torch.equal(_logits(back), hf_logits(model, _ids()))


def test_megatron_args_carry_kimis_routing_and_yarn(kimi, tmp_path):
    _, src = kimi
    pyconv.reshard(src, tmp_path / "meg", to="megatron", ep=8)
    state = torch.load(tmp_path / "meg" / "release" / "mp_rank_00_000" / "model_optim_rng.pt", weights_only=False)
    args = vars(state["args"])
    assert {k: args[k] for k in ("num_experts", "moe_router_topk", "moe_router_topk_scaling_factor",
                                 "moe_router_score_function", "moe_router_enable_expert_bias", "rope_type",
                                 "rotary_scaling_factor", "mscale", "mscale_all_dim", "beta_fast", "beta_slow",
                                 "moe_layer_freq")} == {
        "num_experts": 384, "moe_router_topk": 8, "moe_router_topk_scaling_factor": 2.827,
        "moe_router_score_function": "sigmoid", "moe_router_enable_expert_bias": True, "rope_type": "yarn",
        "rotary_scaling_factor": 32.0, "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 1.0, "beta_slow": 1.0,
        "moe_layer_freq": [0, 1]}
    local = [k for k in state["model"] if ".local_experts." in k and k.startswith("decoder.layers.1.")]
    assert len(local) == 2 * EXPERTS // 8  # linear_fc1 and linear_fc2 of 48 experts on this EP rank


@pytest.mark.parametrize("mp", [1, 8])
def test_deepseek_layout_is_convert_py_byte_for_byte(kimi, tmp_path, mp):
    _, src = kimi
    pyconv.reshard(src, tmp_path / "ours", to="deepseek", tp=mp)
    reference_convert(src, tmp_path / "reference", EXPERTS, mp, mtp_layer=2)
    assert_same_directory(tmp_path / "ours", tmp_path / "reference")


def test_megatron_to_hf_from_the_args_alone_keeps_yarn(kimi, tmp_path):
    """Without the HF config in the args, the YaRN rope comes back from them (rope_type,
    rotary_scaling_factor, mscale, mscale_all_dim, beta_fast/slow, original context)."""
    model, src = kimi
    pyconv.reshard(src, tmp_path / "meg", to="megatron")
    forget_hf_config(tmp_path / "meg")
    pyconv.reshard(tmp_path / "meg", tmp_path / "hf", to="hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["rope_parameters"] == {"rope_type": "yarn", "rope_theta": 50000.0, "factor": 32.0, "mscale": 1.0,
                                         "mscale_all_dim": 1.0, "beta_fast": 1.0, "beta_slow": 1.0,
                                         "original_max_position_embeddings": 4}
    assert torch.equal(_logits(tmp_path / "hf"), hf_logits(model, _ids()))


def test_the_bridge_architecture_name_is_read_and_kept(kimi, tmp_path):
    """Megatron-Bridge registers Kimi K2 as KimiK2ForCausalLM: a config naming it converts with the
    DeepSeek-V3 table and keeps the name."""
    _, src = kimi
    named = with_config(src, tmp_path / "named", architectures=["KimiK2ForCausalLM"])
    round_trip(named, tmp_path, "megatron", ep=4)


def test_megatron_core_runs_it_with_transformers_logits(kimi, tmp_path):
    """Megatron-Core's MLA with YaRN (rotary_scaling_factor 32, mscale, beta_fast/slow) and 384
    sigmoid-routed experts, at ep 1 and ep 2, within 1e-5 of transformers (a judge with plain rope
    misses by 1e-3)."""
    model, src = kimi
    config = json.loads(open(f"{src}/config.json").read())
    config.update(model_type="deepseek_v3")  # the harness knows the architecture by this name
    runs = []
    for ep in (1, 2):
        pyconv.reshard(src, tmp_path / f"ep{ep}", to="megatron", megatron_naming="local", ep=ep)
        runs.append((tmp_path / f"ep{ep}", config, 1, ep, _ids()))
    want = hf_logits(model, _ids())
    for run, got in zip(runs, mh.megatron_logits_many(runs, timeout=240)):
        assert (got - want).abs().max().item() < 1e-5, run[3]
