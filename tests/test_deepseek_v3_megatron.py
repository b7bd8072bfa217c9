"""DeepSeek-V3 through Megatron: multi-latent attention, dense first layers, sigmoid-routed experts
with expert_bias, shared experts, uncounted multi-token-prediction layers dropped; expert tensor
parallelism (counted MTP layers: test_deepseek_v3_mtp.py).

Judges: the safetensors library (bitwise round trips), transformers (loads the result with no
missing or unexpected keys, equal logits) and Megatron-Core 0.16 (CPU, gloo, local spec with
multi_latent_attention, sequential experts, allgather dispatcher: loads pyconv's output with
load_state_dict(strict=True) and its logits match transformers')."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import megatron_harness as mh
import pyconv
from conftest import example_input, nontrivial_vectors
from conftest import hf_logits as _logits
from conftest import load_hf_tensors as hf_tensors
from pyconv.errors import LayoutError

ATOL = 1e-5
VOCAB, HIDDEN = 96, 64


def _config(variant: str, **overrides):
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, moe_intermediate_size=32,
                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32,
                  qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16, max_position_embeddings=64,
                  first_k_dense_replace=1)
    if variant == "q_lora":  # group-limited routing: 4 groups of 2, top-2 groups, top-4 experts
        common.update(q_lora_rank=48, n_routed_experts=8, n_shared_experts=1, n_group=4, topk_group=2,
                      num_experts_per_tok=4, routed_scaling_factor=2.5)
    elif variant == "no_q_lora":  # q_proj instead of q_a_proj/q_b_proj; two shared experts
        common.update(q_lora_rank=None, n_routed_experts=4, n_shared_experts=2, n_group=1, topk_group=1,
                      num_experts_per_tok=2, routed_scaling_factor=1.0)
    else:
        raise ValueError(variant)
    return transformers.DeepseekV3Config(**{**common, **overrides})


def _build(variant, path, seed, **overrides):
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_config(variant, **overrides)).eval()
    nontrivial_vectors(model)
    with torch.no_grad():  # and score-correction biases: a mix-up cannot go unnoticed
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.05)
    model.save_pretrained(path)
    (path / "tokenizer.json").write_text('{"model": {"type": "BPE"}}\n')
    return model, str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepseek_v3_megatron")
    return {v: _build(v, root / v, seed) for seed, v in enumerate(("q_lora", "no_q_lora"))}


def _rank(ckpt, name):
    return torch.load(ckpt / "release" / name / "model_optim_rng.pt", weights_only=False)


# ---- layouts and round trips ------------------------------------------------------------------

LAYOUTS = [  # (tp, pp, ep, etp)
    (1, 1, 1, None), (2, 1, 2, None), (4, 1, 4, None), (1, 3, 2, None), (2, 3, 4, None),
    (2, 1, 2, 1), (4, 1, 2, 2),
]


@pytest.mark.parametrize("naming", ["te", "local"])
@pytest.mark.parametrize("tp, pp, ep, etp", LAYOUTS)
@pytest.mark.parametrize("variant", ["q_lora", "no_q_lora"])
def test_round_trip_is_bitwise(models, tmp_path, variant, tp, pp, ep, etp, naming):
    _, src = models[variant]
    pyconv.reshard(src, tmp_path / "meg", to="megatron", tp=tp, pp=pp, ep=ep, etp=etp, megatron_naming=naming)
    pyconv.reshard(tmp_path / "meg", tmp_path / "back", to="hf")
    source, output = hf_tensors(src), hf_tensors(tmp_path / "back")
    assert source.keys() == output.keys()
    assert [k for k in source if not torch.equal(source[k], output[k])] == []
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == _source_config(src)
    assert (tmp_path / "back" / "tokenizer.json").read_bytes() == (tmp_path / "meg" / "tokenizer.json").read_bytes()


def _source_config(src) -> dict:
    with open(os.path.join(src, "config.json")) as f:
        return json.load(f)


def test_megatron_names_and_shards(models, tmp_path):
    """What Megatron-Core 0.16 names and how it splits each MLA tensor, per spec."""
    _, src = models["q_lora"]
    hf = hf_tensors(src)
    for naming in ("te", "local"):
        out = tmp_path / naming
        pyconv.reshard(src, out, to="megatron", tp=2, megatron_naming=naming)
        for t in range(2):
            sd = _rank(out, f"mp_rank_{t:02d}")["model"]
            a = "decoder.layers.1.self_attention."
            q_up = sd[a + "linear_q_up_proj.weight"]  # heads 2t, 2t+1: [nope | rope] rows each
            assert torch.equal(q_up, hf["model.layers.1.self_attn.q_b_proj.weight"][48 * t:48 * (t + 1)])
            kv_up = sd[a + "linear_kv_up_proj.weight"]  # per head [k_nope | v]
            assert torch.equal(kv_up, hf["model.layers.1.self_attn.kv_b_proj.weight"][64 * t:64 * (t + 1)])
            o = sd[a + "linear_proj.weight"]
            assert torch.equal(o, hf["model.layers.1.self_attn.o_proj.weight"][:, 32 * t:32 * (t + 1)])
            q_down, kv_down = sd[a + "linear_q_down_proj.weight"], sd[a + "linear_kv_down_proj.weight"]
            full_q, full_kv = hf["model.layers.1.self_attn.q_a_proj.weight"], \
                hf["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"]
            if naming == "te":  # TELinear, parallel_mode "duplicated"; norms fused into the up projections
                assert torch.equal(q_down, full_q) and torch.equal(kv_down, full_kv)
                assert torch.equal(sd[a + "linear_q_up_proj.layer_norm_weight"],
                                   hf["model.layers.1.self_attn.q_a_layernorm.weight"])
                assert torch.equal(sd[a + "linear_kv_up_proj.layer_norm_weight"],
                                   hf["model.layers.1.self_attn.kv_a_layernorm.weight"])
                assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in sd  # dense layer 0: fused
            else:  # ColumnParallelLinear: [kv_lora_rank | rope] rows split over TP, gathered before use
                assert torch.equal(q_down, full_q[24 * t:24 * (t + 1)])
                assert torch.equal(kv_down, full_kv[20 * t:20 * (t + 1)])
                assert torch.equal(sd[a + "kv_layernorm.weight"], hf["model.layers.1.self_attn.kv_a_layernorm.weight"])
                assert "decoder.layers.0.pre_mlp_layernorm.weight" in sd
            m = "decoder.layers.1.mlp."
            assert torch.equal(sd[m + "router.expert_bias"], hf["model.layers.1.mlp.gate.e_score_correction_bias"])
            assert sd[m + "router.expert_bias"].dtype == torch.float32
            assert torch.equal(sd[m + "shared_experts.linear_fc1.weight"],
                               torch.cat([hf["model.layers.1.mlp.shared_experts.gate_proj.weight"][16 * t:16 * (t + 1)],
                                          hf["model.layers.1.mlp.shared_experts.up_proj.weight"][16 * t:16 * (t + 1)]]))
            assert "decoder.layers.0.mlp.router.weight" not in sd  # first_k_dense_replace = 1
            assert "decoder.layers.1.pre_mlp_layernorm.weight" in sd  # MoE layers keep it under both namings


def test_megatron_args_describe_deepseek(models, tmp_path):
    model, src = models["q_lora"]
    pyconv.reshard(src, tmp_path / "meg", to="megatron", tp=2, ep=2)
    args = vars(_rank(tmp_path / "meg", "mp_rank_01_001")["args"])
    tc = mh.translate_hf_config(model.config, tp=2, ep=2)["transformer_config"]
    for key in ("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim",
                "multi_latent_attention", "qk_layernorm", "moe_ffn_hidden_size", "moe_layer_freq", "moe_router_topk",
                "moe_router_num_groups", "moe_router_group_topk", "moe_router_score_function",
                "moe_router_enable_expert_bias", "moe_router_topk_scaling_factor",
                "moe_shared_expert_intermediate_size", "rotary_scaling_factor", "rope_type",
                "expert_model_parallel_size", "expert_tensor_parallel_size"):
        assert args[key] == tc[key], key
    assert (args["num_experts"], args["ffn_hidden_size"], args["mtp_num_layers"]) == (8, 96, None)
    info = pyconv.open(tmp_path / "meg").summary()
    assert (info["family"], info["tp"], info["ep"]) == ("deepseek_v3", 2, 2)


def test_relayout_megatron_to_megatron(models, tmp_path):
    model, src = models["q_lora"]
    pyconv.reshard(src, tmp_path / "a", to="megatron", tp=2, pp=3, ep=2, megatron_naming="local")
    pyconv.reshard(tmp_path / "a", tmp_path / "b", to="megatron", tp=4, ep=4, etp=2, moe_grouped_gemm=True)
    pyconv.reshard(tmp_path / "b", tmp_path / "c", to="megatron", tp=1, ep=8)
    pyconv.reshard(tmp_path / "c", tmp_path / "back", to="hf")
    assert pyconv.verify(src, tmp_path / "back").equal
    loaded, info = type(model).from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = example_input(model)
    assert torch.equal(_logits(model, ids), _logits(loaded.eval(), ids))


@pytest.mark.parametrize("variant", ["q_lora", "no_q_lora"])
def test_transformers_logits_after_round_trip(models, tmp_path, variant):
    model, src = models[variant]
    pyconv.reshard(src, tmp_path / "meg", to="megatron", tp=2, ep=2, megatron_naming="local")
    pyconv.reshard(tmp_path / "meg", tmp_path / "back", to="hf")
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == _source_config(src)
    loaded, info = type(model).from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = example_input(model)
    assert torch.equal(_logits(model, ids), _logits(loaded.eval(), ids))


def test_mtp_layers_are_dropped_with_a_note(models, tmp_path):
    from safetensors.torch import save_file

    _, src = models["q_lora"]
    tensors = hf_tensors(src)
    mtp = {  # DeepSeek-V3's multi-token-prediction layer: index num_hidden_layers
        "model.layers.3.enorm.weight": torch.ones(HIDDEN), "model.layers.3.hnorm.weight": torch.ones(HIDDEN),
        "model.layers.3.eh_proj.weight": torch.randn(HIDDEN, 2 * HIDDEN),
        "model.layers.3.shared_head.norm.weight": torch.ones(HIDDEN),
        "model.layers.3.self_attn.q_a_proj.weight": torch.randn(48, HIDDEN),
        "model.layers.3.mlp.experts.0.gate_proj.weight": torch.randn(32, HIDDEN),
    }
    (tmp_path / "src").mkdir()
    save_file({**tensors, **mtp}, tmp_path / "src" / "model.safetensors", metadata={"format": "pt"})
    # a config that does not count the layer (test_deepseek_v3_mtp.py converts counted ones)
    (tmp_path / "src" / "config.json").write_text(json.dumps({**_source_config(src), "num_nextn_predict_layers": 0}))
    note = ("dropped 6 tensors of layers 3 (index >= num_hidden_layers 3: multi-token-prediction layers, "
            "not part of the Megatron model)")
    report = pyconv.reshard(tmp_path / "src", tmp_path / "meg", to="megatron", tp=2, ep=2)
    assert report.plan.notes == (note,)
    pyconv.reshard(tmp_path / "meg", tmp_path / "back", to="hf")
    assert hf_tensors(tmp_path / "back").keys() == tensors.keys()
    assert pyconv.verify(src, tmp_path / "back").equal
    # counted but absent (transformers' default num_nextn_predict_layers is 1): nothing to keep
    assert _source_config(src)["num_nextn_predict_layers"] == 1
    assert pyconv.reshard(src, tmp_path / "meg1", to="megatron").plan.notes == ()
    assert _rank(tmp_path / "meg1", "mp_rank_00")["args"].mtp_num_layers is None
    cli = subprocess.run([sys.executable, "-m", "pyconv", "reshard", str(tmp_path / "src"), str(tmp_path / "meg2"),
                          "--to", "megatron", "--etp", "1", "--tp", "2", "--ep", "2"], capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    assert f"note: {note}" in cli.stdout
    assert sorted(os.listdir(tmp_path / "meg2" / "release")) == ["mp_rank_00_000", "mp_rank_01_001"]


def test_unsupported_deepseek_configs_are_refused(tmp_path):
    for overrides, message in (
        (dict(rope_interleave=False), "rope_interleave is false"),
        (dict(n_group=4, topk_group=1), "HF ranks groups by their top-2 scores"),
        (dict(norm_topk_prob=False), "norm_topk_prob is false"),
    ):
        _, src = _build("q_lora", tmp_path / str(len(message)), 0, **overrides)
        with pytest.raises(LayoutError, match=message):
            pyconv.reshard(src, tmp_path / f"out{len(message)}", to="megatron")


# ---- Megatron-Core as the judge -----------------------------------------------------------------

TORCHRUN = [("q_lora", 2, 1, None), ("q_lora", 1, 2, None), ("q_lora", 2, 2, 1), ("no_q_lora", 2, 1, None)]


@pytest.fixture(scope="module")
def torchrun_logits(models, tmp_path_factory):
    """One torchrun start (2 processes) for every layout of TORCHRUN."""
    root = tmp_path_factory.mktemp("deepseek_v3_torchrun")
    runs = []
    for variant, tp, ep, etp in TORCHRUN:
        model, src = models[variant]
        out = root / f"{variant}_tp{tp}_ep{ep}_etp{etp}"
        pyconv.reshard(src, out, to="megatron", tp=tp, ep=ep, etp=etp, megatron_naming="local")
        runs.append((out, src, tp, ep, example_input(model), etp))
    saves = [(models["q_lora"][1], root / "saved_by_megatron_tp2", 2, 1)]
    logits = mh.megatron_logits_many(runs, timeout=240, saves=saves)
    return {**dict(zip(TORCHRUN, zip((r[0] for r in runs), logits))), "saved_tp2": saves[0][1]}


pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:megatron"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:megatron"),
]
needs_megatron = pytest.mark.skipif(not mh.megatron_available(), reason="megatron-core is not installed")


@needs_megatron
@pytest.mark.parametrize("variant", ["q_lora", "no_q_lora"])
def test_megatron_core_runs_pyconv_output_tp1(models, tmp_path, variant):
    model, src = models[variant]
    pyconv.reshard(src, tmp_path / "meg", to="megatron", megatron_naming="local")
    ids = example_input(model)
    got = mh.megatron_logits(tmp_path / "meg", src, 1, ids)  # load_state_dict(strict=True)
    assert got.shape == (2, 11, VOCAB)
    assert (got - _logits(model, ids)).abs().max().item() < ATOL


@needs_megatron
def test_megatron_core_notices_scrambled_rope_channels(models, tmp_path):
    """The judge is sensitive to the rope layout: swapping the even and odd rope channels of
    kv_a_proj_with_mqa (what a converter that gets `rope_interleave` wrong does) changes the logits."""
    model, src = models["q_lora"]
    pyconv.reshard(src, tmp_path / "meg", to="megatron", megatron_naming="local")
    f = tmp_path / "meg" / "release" / "mp_rank_00" / "model_optim_rng.pt"
    ckpt = torch.load(f, weights_only=False)
    for layer in range(3):
        w = ckpt["model"][f"decoder.layers.{layer}.self_attention.linear_kv_down_proj.weight"]
        rope = w[32:].clone()
        w[32:] = torch.cat([rope[0::2], rope[1::2]])
    torch.save(ckpt, f)
    ids = example_input(model)
    assert (mh.megatron_logits(tmp_path / "meg", src, 1, ids) - _logits(model, ids)).abs().max().item() > 1e-3


@needs_megatron
@pytest.mark.parametrize("variant, tp, ep, etp", TORCHRUN)
def test_megatron_core_runs_pyconv_output_torchrun(models, torchrun_logits, variant, tp, ep, etp):
    model, _ = models[variant]
    ckpt, got = torchrun_logits[(variant, tp, ep, etp)]
    ranks = sorted(os.listdir(ckpt / "release"))
    if etp is not None:  # Megatron-Core's ranks 0 and 1 read mp_rank_00_000 and mp_rank_01_001
        assert ranks == ["mp_rank_00_000", "mp_rank_01_001"]
    assert (got - _logits(model, example_input(model))).abs().max().item() < ATOL


# ---- fp8 (DeepSeek's released layout) ------------------------------------------------------------

@pytest.fixture(scope="module")
def fp8_model(models, tmp_path_factory):
    """The q_lora model with its layers' linear weights in e4m3fn with 128x128 block scales."""
    _, src = models["q_lora"]
    out = tmp_path_factory.mktemp("deepseek_v3_fp8") / "fp8"
    pyconv.reshard(src, out, to="hf", dtype="fp8")
    return str(out)


def test_fp8_source_needs_a_float_dtype(fp8_model, tmp_path):
    with pytest.raises(LayoutError, match="is fp8 with block scales, which a Megatron checkpoint cannot hold: "
                                          "convert with dtype bf16"):
        pyconv.reshard(fp8_model, tmp_path / "meg", to="megatron", tp=2, ep=2)


def test_fp8_to_megatron_bf16_dequantizes_as_the_hf_path(fp8_model, tmp_path):
    """fp8 -> Megatron (bf16, dequantized in the core) -> HF equals fp8 -> HF bf16, except the
    router's score-correction bias, which Megatron keeps in float32."""
    pyconv.reshard(fp8_model, tmp_path / "meg", to="megatron", tp=2, ep=2, dtype="bf16", megatron_naming="local")
    sd = _rank(tmp_path / "meg", "mp_rank_01_001")["model"]
    assert sd["decoder.layers.1.mlp.experts.local_experts.0.linear_fc1.weight"].dtype == torch.bfloat16
    assert sd["decoder.layers.1.mlp.router.expert_bias"].dtype == torch.float32
    pyconv.reshard(tmp_path / "meg", tmp_path / "back", to="hf")
    pyconv.reshard(fp8_model, tmp_path / "direct", to="hf", dtype="bf16")
    back, direct, fp8 = hf_tensors(tmp_path / "back"), hf_tensors(tmp_path / "direct"), hf_tensors(fp8_model)
    assert back.keys() == direct.keys()
    bias = {k for k in back if k.endswith("e_score_correction_bias")}
    assert [k for k in back if k not in bias and not torch.equal(back[k], direct[k])] == []
    assert all(torch.equal(back[k], fp8[k]) and back[k].dtype == torch.float32 for k in bias)
    w = "model.layers.1.self_attn.kv_b_proj.weight"  # W = fp8 x scale (one 128 x 128 block here)
    assert torch.equal(back[w], (fp8[w].float() * fp8[w + "_scale_inv"]).to(torch.bfloat16))


@needs_megatron
def test_megatron_core_runs_dequantized_fp8(models, fp8_model, tmp_path):
    model, _ = models["q_lora"]
    pyconv.reshard(fp8_model, tmp_path / "meg", to="megatron", dtype="bf16", megatron_naming="local")
    pyconv.reshard(tmp_path / "meg", tmp_path / "hf", to="hf")
    reference = type(model).from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = example_input(model)
    got = mh.megatron_logits(tmp_path / "meg", str(tmp_path / "hf"), 1, ids)
    assert (got - _logits(reference, ids)).abs().max().item() < ATOL


@needs_megatron
@pytest.mark.parametrize("tp", [1, 2])
def test_checkpoint_saved_by_megatron_core_converts_to_hf(models, torchrun_logits, tmp_path, tp):
    """The other direction: Megatron-Core's own MLA GPTModel.state_dict() (filled by plain
    gather/split code), read by pyconv, gives back the HF tensors; at tp=2 its local-spec down
    projections are column-parallel shards."""
    model, src = models["q_lora"]
    if tp == 1:
        ckpt = mh.save_with_megatron(src, tmp_path / "mg", tp=1)
    else:
        ckpt = torchrun_logits["saved_tp2"]
        sd = _rank(ckpt, "mp_rank_01")["model"]
        assert tuple(sd["decoder.layers.0.self_attention.linear_kv_down_proj.weight"].shape) == (20, HIDDEN)
    info = pyconv.open(ckpt).summary()
    assert (info["family"], info["tp"]) == ("deepseek_v3", tp)
    pyconv.reshard(ckpt, tmp_path / "hf", to="hf")
    source, output = hf_tensors(src), hf_tensors(tmp_path / "hf")
    assert source.keys() == output.keys()
    assert [k for k in source if not torch.equal(source[k], output[k])] == []
    # No HF config travels with Megatron-Core's checkpoint: the one rebuilt from its args runs the same model.
    loaded, info = type(model).from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = example_input(model)
    assert torch.equal(_logits(model, ids), _logits(loaded.eval(), ids))


def test_megatron_to_deepseek_layout_equals_hf_to_deepseek(models, tmp_path):
    _, src = models["q_lora"]
    pyconv.reshard(src, tmp_path / "meg", to="megatron", tp=2, pp=3, ep=4, etp=1)
    pyconv.reshard(tmp_path / "meg", tmp_path / "ds", to="deepseek", tp=2)
    pyconv.reshard(src, tmp_path / "ds_direct", to="deepseek", tp=2)
    for name in ("model0-mp2.safetensors", "model1-mp2.safetensors"):
        assert (tmp_path / "ds" / name).read_bytes() == (tmp_path / "ds_direct" / name).read_bytes()


def test_yarn_rope_args_and_back(tmp_path):
    """DeepSeek-V3's released config uses YaRN: Megatron-LM's --rope-type yarn and its factors."""
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "beta_fast": 32.0, "beta_slow": 1.0,
            "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 16}
    _, src = _build("q_lora", tmp_path / "yarn", 0, rope_parameters=rope)
    pyconv.reshard(src, tmp_path / "meg", to="megatron")
    args = vars(_rank(tmp_path / "meg", "mp_rank_00")["args"])
    assert {k: args[k] for k in ("rope_type", "rotary_scaling_factor", "mscale", "mscale_all_dim", "beta_fast",
                                 "beta_slow", "original_max_position_embeddings", "rotary_base")} == \
        {"rope_type": "yarn", "rotary_scaling_factor": 40.0, "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32.0,
         "beta_slow": 1.0, "original_max_position_embeddings": 16, "rotary_base": 10000.0}
    pyconv.reshard(tmp_path / "meg", tmp_path / "back", to="hf")
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == _source_config(src)


def test_wrong_latent_down_shard_is_named(models, tmp_path):
    _, src = models["q_lora"]
    pyconv.reshard(src, tmp_path / "meg", to="megatron", tp=2, megatron_naming="local")
    f = tmp_path / "meg" / "release" / "mp_rank_01" / "model_optim_rng.pt"
    ckpt = torch.load(f, weights_only=False)
    key = "decoder.layers.2.self_attention.linear_kv_down_proj.weight"
    ckpt["model"][key] = ckpt["model"][key][:10].clone()
    torch.save(ckpt, f)
    with pytest.raises(pyconv.FormatError, match=rf"mp_rank_01/model_optim_rng.pt: tensor '{key}' has shape "
                                                 r"\[10, 64\], expected \[40, 64\]"):
        pyconv.open(tmp_path / "meg")
