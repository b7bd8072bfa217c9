"""Dense families of 2025-2026 (first ones): Seed-OSS and Llama 3.x rope scaling through the Llama
table, Phi-3 and SmolLM3.

Seed-OSS is Llama's layout with q/k/v biases and, separately, an o_proj bias (attention_out_bias)
and MLP biases (mlp_bias). Llama 3.1's `rope_type: llama3` and linear rope scaling are Megatron-LM
args (use_rope_scaling / rope_scaling_factor, rotary_seq_len_interpolation_factor) that
Megatron-Core applies; other rope types are refused by name. Phi-3 fuses q/k/v and gate/up in HF
(taken apart by row offsets) and rotates part of each head (partial_rotary_factor ->
rotary_percent). SmolLM3's NoPE layers are Megatron-Core's no_rope_freq. Judged by transformers (no missing or unexpected keys, the same logits) and by
Megatron-Core (strict load, logits within 1e-5)."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers

import megatron_harness as mh
import pyconv
from conftest import TOKENIZER_FILES, hf_logits, load_hf_tensors
from pyconv.errors import LayoutError

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
ATOL = 1e-5


def _save(model, path):
    with torch.no_grad():  # non-trivial norms and biases, so that a swapped tensor cannot hide
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    model.save_pretrained(path)
    for name, text in TOKENIZER_FILES.items():
        (path / name).write_text(text)
    return model.eval(), str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("seed_oss")
    torch.manual_seed(0)
    seed = transformers.SeedOssConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                      max_position_embeddings=64, attention_bias=True, attention_out_bias=False,
                                      mlp_bias=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    out = {"seed_oss": _save(transformers.SeedOssForCausalLM(seed), root / "seed_oss")}
    torch.manual_seed(1)
    biased = transformers.SeedOssConfig(**{**seed.to_dict(), "attention_out_bias": True, "mlp_bias": True})
    out["seed_oss_biases"] = _save(transformers.SeedOssForCausalLM(biased), root / "seed_oss_biases")
    torch.manual_seed(2)
    llama3 = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      rope_parameters=dict(LLAMA3_ROPE))
    model = transformers.LlamaForCausalLM(llama3)
    with torch.no_grad():  # sharp attention, so that the scaled rope angles move the logits
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(12.0)
            layer.self_attn.k_proj.weight.mul_(12.0)
    out["llama3_rope"] = _save(model, root / "llama3_rope")
    torch.manual_seed(3)
    phi3 = transformers.Phi3Config(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                    "partial_rotary_factor": 0.75})
    model = transformers.Phi3ForCausalLM(phi3)
    with torch.no_grad():  # sharp attention: rotating the wrong dims must show in the logits
        for layer in model.model.layers:
            layer.self_attn.qkv_proj.weight.mul_(8.0)
    out["phi3"] = _save(model, root / "phi3")
    torch.manual_seed(4)
    smol = transformers.SmolLM3Config(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      no_rope_layers=[1, 0, 1, 1], pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = transformers.SmolLM3ForCausalLM(smol)
    with torch.no_grad():  # sharp attention: a NoPE layer that rotates must show in the logits
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    out["smollm3"] = _save(model, root / "smollm3")
    return out


def _long_input(model):
    """The whole context (64 positions): llama3 scaling changes the rope frequencies whose
    wavelength exceeds 2048 positions, by angles that grow with the position; with sharp attention
    these move the logits well past the tolerance (checked: a judge without the scaling fails)."""
    return torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))


def _config(path) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def _load(path, cls):
    model, info = cls.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


CLASSES = {"seed_oss": transformers.SeedOssForCausalLM, "seed_oss_biases": transformers.SeedOssForCausalLM,
           "llama3_rope": transformers.LlamaForCausalLM, "phi3": transformers.Phi3ForCausalLM,
           "smollm3": transformers.SmolLM3ForCausalLM}


@pytest.mark.parametrize("name", sorted(CLASSES))
@pytest.mark.parametrize("to, options", [("megatron", {"tp": 1}), ("megatron", {"tp": 2, "pp": 2}),
                                         ("megatron", {"tp": 4}), ("torch_dist", {})])
def test_round_trip_is_bitwise_and_transformers_agrees(models, tmp_path, name, to, options):
    model, src = models[name]
    pyconv.reshard(src, tmp_path / "mid", to=to, **options)
    pyconv.reshard(tmp_path / "mid", tmp_path / "hf", to="hf")
    got, want = load_hf_tensors(tmp_path / "hf"), load_hf_tensors(src)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert json.loads((tmp_path / "hf" / "config.json").read_text()) == _config(src)
    loaded = _load(tmp_path / "hf", CLASSES[name])
    ids = _long_input(model)
    assert torch.equal(hf_logits(loaded, ids), hf_logits(model, ids))


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_megatron_core_loads_it_with_transformers_logits(models, tmp_path, name):
    model, src = models[name]
    pyconv.reshard(src, tmp_path / "meg", to="megatron", megatron_naming="local")
    ids = _long_input(model)
    got = mh.megatron_logits(tmp_path / "meg", _config(src), 1, ids)
    assert (got - hf_logits(model, ids)).abs().max().item() < ATOL


def test_args_carry_the_rope_scaling_and_the_biases(models):
    from pyconv.families import get_family

    for name, expected in (("llama3_rope", {"use_rope_scaling": True, "rope_scaling_factor": 8.0,
                                            "add_qkv_bias": False, "add_bias_linear": False, "rotary_percent": 1.0}),
                           ("seed_oss", {"add_qkv_bias": True, "add_bias_linear": False}),
                           ("seed_oss_biases", {"add_qkv_bias": True, "add_bias_linear": True}),
                           ("phi3", {"add_qkv_bias": False, "add_bias_linear": False, "rotary_percent": 0.75,
                                     "untie_embeddings_and_output_weights": False}),
                           ("smollm3", {"no_rope_freq": [0, 1, 0, 0], "untie_embeddings_and_output_weights": False})):
        config = _config(models[name][1])
        family = get_family({"llama3_rope": "llama", "phi3": "phi3", "smollm3": "smollm3"}.get(name, "seed_oss"))
        args = family.megatron_args_from_hf(config, family.dims_from_hf(config))
        assert {k: args.get(k) for k in expected} == expected, name
        judge = mh.translate_hf_config(config)
        assert judge["gpt_model"].get("rope_scaling", False) == bool(args.get("use_rope_scaling"))
        assert judge["gpt_model"].get("rope_scaling_factor", 8.0) == args.get("rope_scaling_factor", 8.0)
        assert judge["gpt_model"]["rotary_percent"] == args["rotary_percent"]
        assert (judge["transformer_config"]["add_qkv_bias"], judge["transformer_config"]["add_bias_linear"]) == (
            args["add_qkv_bias"], args["add_bias_linear"])
        assert judge["transformer_config"].get("no_rope_freq") == args.get("no_rope_freq")


def test_inspect_shows_the_new_args(models, tmp_path):
    shown = {}
    for name in ("llama3_rope", "phi3", "smollm3", "seed_oss"):
        pyconv.reshard(models[name][1], tmp_path / name, to="megatron")
        shown[name] = pyconv.open(tmp_path / name).summary()["args"]
    assert (shown["llama3_rope"]["use_rope_scaling"], shown["llama3_rope"]["rope_scaling_factor"]) == (True, 8.0)
    assert shown["phi3"]["rotary_percent"] == 0.75 and shown["smollm3"]["no_rope_freq"] == [0, 1, 0, 0]
    assert (shown["seed_oss"]["add_qkv_bias"], shown["seed_oss"]["add_bias_linear"]) == (True, False)


def test_megatron_to_hf_from_the_args_alone(models, tmp_path):
    """Without the HF config pyconv keeps in the args: Llama 3's rope comes back from
    use_rope_scaling, and Seed-OSS reads as Qwen2 (the same args, the same model)."""
    for name, cls in (("llama3_rope", transformers.LlamaForCausalLM), ("seed_oss", transformers.Qwen2ForCausalLM),
                      ("phi3", transformers.Phi3ForCausalLM), ("smollm3", transformers.SmolLM3ForCausalLM)):
        model, src = models[name]
        meg = tmp_path / name
        pyconv.reshard(src, meg, to="megatron")
        rank_file = meg / "release" / "mp_rank_00" / "model_optim_rng.pt"
        state = torch.load(rank_file, weights_only=False)
        del state["args"].pyconv_hf_config
        torch.save(state, rank_file)
        pyconv.reshard(meg, tmp_path / f"{name}_hf", to="hf")
        loaded = _load(tmp_path / f"{name}_hf", cls)
        ids = _long_input(model)
        assert torch.equal(hf_logits(loaded, ids), hf_logits(model, ids)), name
    config = json.loads((tmp_path / "llama3_rope_hf" / "config.json").read_text())
    assert {k: config["rope_parameters"][k] for k in LLAMA3_ROPE} == LLAMA3_ROPE


@pytest.mark.parametrize("change, message", [
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}},
     "rope_type 'yarn' has no Megatron-Core equivalent for this model"),
    ({"rope_parameters": {**LLAMA3_ROPE, "low_freq_factor": 2.0}},
     "llama3 rope scaling with .* Megatron-Core applies it with"),
    ({"attention_out_bias": True}, "o_proj has a bias and the MLP has none"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                          "short_factor": [1.0] * 6, "long_factor": [2.0] * 6,
                          "original_max_position_embeddings": 32}}, "Phi-3's LongRoPE .* has no Megatron-Core"),
])
def test_what_megatron_core_cannot_express_is_refused(models, tmp_path, change, message):
    src = tmp_path / "src"
    _, original = models["phi3" if "longrope" in json.dumps(change) else "seed_oss"]
    os.makedirs(src)
    for name in os.listdir(original):
        if name != "config.json":
            os.symlink(os.path.join(original, name), src / name)
    (src / "config.json").write_text(json.dumps({**_config(original), **change}))
    with pytest.raises(LayoutError, match=message):
        pyconv.reshard(src, tmp_path / "meg", to="megatron")
    assert not (tmp_path / "meg").exists()


def test_nemo_has_no_seed_oss_model_class(models, tmp_path):
    with pytest.raises(LayoutError, match="no NeMo 2 model class for the seed_oss family"):
        pyconv.reshard(models["seed_oss"][1], tmp_path / "nemo", to="nemo")
