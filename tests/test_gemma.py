"""Gemma 2 and Gemma 3 (text) (#17): tiny models with every optional feature on (soft caps, a
sliding window shorter than the input, custom layer_types, query_pre_attn_scalar != head_dim,
Gemma 3's q/k norms, its own rope base on sliding layers and linear scaling on full ones).

Judged by transformers (no missing or unexpected keys, the same logits, the same config) and by
Megatron-Core running Megatron-Bridge's Gemma layers (tests/bridge_layers.py: post-norms inside
linear_proj / linear_fc2, 1 + weight norms, soft caps, scaled embeddings, two rope bases), which
builds the model from the HF config on its own and loads pyconv's output strictly."""

from __future__ import annotations

import pytest
import torch
import transformers

import megatron_harness as mh
import pyconv
from conftest import (
    config_json, forget_hf_config, hf_logits, load_hf_tensors, nontrivial_vectors, round_trip, save_tiny_model,
    with_config,
)
from pyconv.errors import LayoutError

ATOL = 1e-5
GEMMA3_LAYERS = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention", "full_attention",
                 "sliding_attention"]


def _sharp(model):
    """Random norms; queries and keys scaled up so that the soft cap and the window bite."""
    nontrivial_vectors(model)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(6.0)
    return model.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma")
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, max_position_embeddings=64, sliding_window=8, query_pre_attn_scalar=24)
    torch.manual_seed(0)
    gemma2 = transformers.Gemma2Config(num_hidden_layers=4, attn_logit_softcapping=4.0, final_logit_softcapping=2.0,
                                       **common)
    out = {"gemma2": _sharp(transformers.Gemma2ForCausalLM(gemma2))}
    torch.manual_seed(1)
    gemma3 = transformers.Gemma3TextConfig(
        num_hidden_layers=6, layer_types=GEMMA3_LAYERS,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                         "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}}, **common)
    out["gemma3"] = _sharp(transformers.Gemma3ForCausalLM(gemma3))
    return {name: (model, save_tiny_model(model, root / name)) for name, model in out.items()}


CLASSES = {"gemma2": transformers.Gemma2ForCausalLM, "gemma3": transformers.Gemma3ForCausalLM}


def _ids(model):
    """40 positions: past the 8-token window, far enough for the rope bases to differ."""
    return torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))


def _load(path, cls):
    model, info = cls.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


@pytest.mark.parametrize("name", sorted(CLASSES))
@pytest.mark.parametrize("to, options", [("megatron", {"tp": 1}), ("megatron", {"tp": 2, "pp": 2}),
                                         ("megatron", {"tp": 4}), ("torch_dist", {})])
def test_round_trip_is_bitwise_and_transformers_agrees(models, tmp_path, name, to, options):
    model, src = models[name]
    back = round_trip(src, tmp_path, to, **options)
    ids = _ids(model)
    assert torch.equal(hf_logits(_load(back, CLASSES[name]), ids), hf_logits(model, ids))


def test_megatron_core_runs_it_with_transformers_logits(models, tmp_path):
    """Megatron-Core with Megatron-Bridge's Gemma layers, tp 1 and tp 2 (one torchrun for both)."""
    runs, want = [], []
    for name in sorted(CLASSES):
        model, src = models[name]
        for tp in (1, 2):
            pyconv.reshard(src, tmp_path / f"{name}{tp}", to="megatron", megatron_naming="local", tp=tp)
            runs.append((tmp_path / f"{name}{tp}", config_json(src), tp, 1, _ids(model)))
            want.append(hf_logits(model, _ids(model)))
    for run, got, expected in zip(runs, mh.megatron_logits_many(runs), want):
        assert (got - expected).abs().max().item() < ATOL, run[0]


# Megatron-Bridge @067f987d, gemma2_bridge.py / gemma3_bridge.py: one decoder layer's names (TE
# spec, the bridge's only one) and the model's own; q/k norms in Gemma 3 only.
BRIDGE_LAYER = {
    "self_attention.linear_qkv.layer_norm_weight": lambda d: (64,),
    "self_attention.linear_qkv.weight": lambda d: ((4 + 2 * 2) * 16, 64),
    "self_attention.linear_proj.weight": lambda d: (64, 4 * 16),
    "self_attention.linear_proj.post_layernorm.weight": lambda d: (64,),
    "mlp.linear_fc1.layer_norm_weight": lambda d: (64,),
    "mlp.linear_fc1.weight": lambda d: (2 * 96, 64),
    "mlp.linear_fc2.weight": lambda d: (64, 96),
    "mlp.linear_fc2.post_layernorm.weight": lambda d: (64,),
}
BRIDGE_QK_NORM = {"self_attention.q_layernorm.weight": lambda d: (16,),
                  "self_attention.k_layernorm.weight": lambda d: (16,)}


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_names_and_shapes_are_megatron_bridges(models, tmp_path, name):
    model, src = models[name]
    pyconv.reshard(src, tmp_path / "meg", to="megatron")
    state = torch.load(tmp_path / "meg" / "release" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)
    got = {k: tuple(v.shape) for k, v in state["model"].items() if not k.endswith("_extra_state")}
    layer = {**BRIDGE_LAYER, **(BRIDGE_QK_NORM if name == "gemma3" else {})}
    want = {"embedding.word_embeddings.weight": (128, 64), "decoder.final_layernorm.weight": (64,)}
    for i in range(model.config.num_hidden_layers):
        want.update({f"decoder.layers.{i}.{k}": shape(None) for k, shape in layer.items()})
    assert got == want


def test_args_say_what_megatron_core_and_the_bridge_need(models):
    from pyconv.families import get_family

    for name, expected in (
            ("gemma2", {"window_size": (7, 0), "window_attn_skip_freq": [1, 0, 1, 0], "query_pre_attn_scalar": 24.0,
                        "softmax_scale": 24 ** -0.5, "attn_logit_softcapping": 4.0, "final_logit_softcapping": 2.0,
                        "apply_layernorm_1p": True, "gated_linear_unit": True, "swiglu": False, "openai_gelu": True,
                        "rotary_base": 10000.0, "untie_embeddings_and_output_weights": False}),
            ("gemma3", {"window_size": (7, 0), "window_attn_skip_freq": [1, 1, 0, 1, 0, 1], "qk_layernorm": True,
                        "rotary_base": 10000.0, "rotary_base_local": 100.0, "rope_scaling_factor": 4.0,
                        "softmax_scale": 24 ** -0.5, "apply_layernorm_1p": True})):
        config = config_json(models[name][1])
        family = get_family(name)
        args = family.megatron_args_from_hf(config, family.dims_from_hf(config))
        assert {k: args.get(k) for k in expected} == expected, name
        judge = mh.translate_hf_config(config)["transformer_config"]
        assert (judge["window_size"], judge["window_attn_skip_freq"]) == (args["window_size"],
                                                                          args["window_attn_skip_freq"])


def test_megatron_to_hf_from_the_args_alone(models, tmp_path):
    """Without the HF config pyconv keeps in the args: the family, windows, caps and rope bases come
    back from the args and transformers gives the same logits."""
    for name, cls in CLASSES.items():
        model, src = models[name]
        meg = tmp_path / name
        pyconv.reshard(src, meg, to="megatron", tp=2)
        forget_hf_config(meg)
        pyconv.reshard(meg, tmp_path / f"{name}_hf", to="hf")
        config = config_json(tmp_path / f"{name}_hf")
        assert config["architectures"] == [cls.__name__]
        assert config["layer_types"] == model.config.layer_types
        ids = _ids(model)
        assert torch.equal(hf_logits(_load(tmp_path / f"{name}_hf", cls), ids), hf_logits(model, ids)), name


@pytest.mark.parametrize("to", ["megatron", "torch_dist"])
def test_no_note_of_a_window_the_args_carry(models, tmp_path, to):
    """Mistral's window is not in Megatron-LM's args (a note says so); Gemma's is (window_size)."""
    report = pyconv.reshard(models["gemma2"][1], tmp_path / "out", to=to)
    assert not [n for n in report.plan.notes if "sliding_window" in n]


def test_inspect_shows_the_gemma_args(models, tmp_path):
    pyconv.reshard(models["gemma2"][1], tmp_path / "meg", to="megatron")
    args = pyconv.open(tmp_path / "meg").summary()["args"]
    assert (args["attn_logit_softcapping"], args["final_logit_softcapping"]) == (4.0, 2.0)
    assert args["apply_layernorm_1p"] is True and list(args["window_size"]) == [7, 0]


@pytest.mark.parametrize("name, change, message", [
    ("gemma2", {"attention_bias": True}, "Gemma with attention_bias"),
    ("gemma2", {"hidden_activation": "relu"}, "hidden_activation 'relu' has no Megatron equivalent"),
    ("gemma2", {"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0}},
     "Gemma 2 with rope_type 'yarn'"),
    ("gemma2", {"layer_types": ["sliding_attention"] * 3}, "layer_types must list 4"),
    ("gemma3", {"final_logit_softcapping": 30.0}, "Gemma 3 with logit soft-capping"),
    ("gemma3", {"rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                                    "full_attention": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10.0}}},
     "full-attention layers with rope_type 'yarn'"),
])
def test_what_megatron_cannot_express_is_refused(models, tmp_path, name, change, message):
    src = with_config(models[name][1], tmp_path / "src", **change)
    with pytest.raises(LayoutError, match=message):
        pyconv.reshard(src, tmp_path / "meg", to="megatron")
    assert not (tmp_path / "meg").exists()


@pytest.fixture(scope="module")
def multimodal(tmp_path_factory):
    torch.manual_seed(2)
    text = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=64, sliding_window=8,
                query_pre_attn_scalar=24)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=95, boi_token_index=93, eoi_token_index=94)
    model = nontrivial_vectors(transformers.Gemma3ForConditionalGeneration(config)).eval()
    return model, save_tiny_model(model, tmp_path_factory.mktemp("gemma3_vl") / "src")


def test_multimodal_gemma3_travels_hf_to_hf_whole(multimodal, tmp_path):
    model, src = multimodal
    pyconv.reshard(src, tmp_path / "hf", to="hf", max_shard_size="40KB")
    got, want = load_hf_tensors(tmp_path / "hf"), load_hf_tensors(src)
    assert any(k.startswith("vision_tower.") for k in want)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    loaded = _load(tmp_path / "hf", transformers.Gemma3ForConditionalGeneration)
    ids = torch.randint(0, 90, (1, 12), generator=torch.Generator().manual_seed(3))
    assert torch.equal(hf_logits(loaded, ids), hf_logits(model, ids))


@pytest.mark.parametrize("to", ["megatron", "torch_dist"])
def test_multimodal_gemma3_to_megatron_is_refused_naming_the_vision_tower(multimodal, tmp_path, to):
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "pyconv", "reshard", multimodal[1], str(tmp_path / "out"), "--to", to],
                         capture_output=True, text=True)
    assert run.returncode == 2, run.stderr
    assert "Gemma3ForConditionalGeneration: the vision tower ('vision_tower.*')" in run.stderr
    assert "--language-model" in run.stderr
    assert not (tmp_path / "out").exists()


def test_the_language_model_alone_converts_and_runs(multimodal, tmp_path):
    """--language-model: the text model (Gemma3ForCausalLM) through Megatron tp 2 back to HF holds
    the multimodal checkpoint's language-model tensors bit for bit and gives its logits on text;
    Megatron-Core runs it too. The left-out parts are named in a note."""
    model, src = multimodal
    report = pyconv.reshard(src, tmp_path / "meg", to="megatron", tp=2, language_model=True)
    assert any("left out: 2 'multi_modal_projector.*', 32 'vision_tower.*' tensors" in n for n in report.plan.notes)
    pyconv.reshard(tmp_path / "meg", tmp_path / "hf", to="hf")
    got, want = load_hf_tensors(tmp_path / "hf"), load_hf_tensors(src)
    renamed = {k.replace("language_model.model.", "model."): v for k, v in want.items()
               if k.startswith("language_model.")}
    assert got.keys() == renamed.keys() and all(torch.equal(got[k], renamed[k]) for k in renamed)
    text = _load(tmp_path / "hf", transformers.Gemma3ForCausalLM)
    assert config_json(tmp_path / "hf")["architectures"] == ["Gemma3ForCausalLM"]
    ids = torch.randint(0, 90, (2, 24), generator=torch.Generator().manual_seed(3))
    assert torch.allclose(hf_logits(text, ids), hf_logits(model, ids), rtol=0, atol=1e-6)
    pyconv.reshard(src, tmp_path / "local", to="megatron", megatron_naming="local", language_model=True)
    got = mh.megatron_logits(tmp_path / "local", config_json(tmp_path / "hf"), 1, ids)
    assert (got - hf_logits(model, ids)).abs().max().item() < ATOL


def test_language_model_of_a_text_checkpoint_is_refused(models, tmp_path):
    with pytest.raises(LayoutError, match="--language-model takes a multimodal checkpoint .* Gemma2ForCausalLM"):
        pyconv.reshard(models["gemma2"][1], tmp_path / "out", to="megatron", language_model=True)


def test_nemo_refuses_layer_types_its_gemma3_config_cannot_hold(models, tmp_path):
    """NeMo 2.5's Gemma3Config puts a full layer every interleaved_attn_pattern layers; this
    model's layer_types (full at 3 and 5) are no such pattern."""
    with pytest.raises(LayoutError, match="NeMo 2's Gemma3Config places a full layer every"):
        pyconv.reshard(models["gemma3"][1], tmp_path / "nemo", to="nemo")
    assert not (tmp_path / "nemo").exists()


@pytest.mark.parametrize("name, change, message", [
    ("gemma2", {"query_pre_attn_scalar": -24}, "query_pre_attn_scalar must be a positive number, got -24"),
    ("gemma2", {"attn_logit_softcapping": "big"}, "attn_logit_softcapping must be a positive number, got 'big'"),
    ("gemma2", {"rope_parameters": {"rope_type": "default", "rope_theta": True}},
     "rope_parameters.rope_theta must be a positive number, got True"),
    ("gemma3", {"rope_parameters": {"sliding_attention": {"rope_theta": -1.0}, "full_attention": {"rope_theta": 1.0}}},
     "the sliding layers' rope_theta must be a positive number, got -1.0"),
])
def test_hostile_config_values_are_refused_naming_the_field(models, tmp_path, name, change, message):
    """Values that would reach the args as complex numbers, strings or negative scales: exit 2 with
    the field named, nothing written."""
    import subprocess
    import sys

    src = with_config(models[name][1], tmp_path / "src", **change)
    run = subprocess.run([sys.executable, "-m", "pyconv", "reshard", str(src), str(tmp_path / "meg"), "--to",
                          "megatron"], capture_output=True, text=True)
    assert run.returncode == 2 and message in run.stderr, run.stderr
    assert not (tmp_path / "meg").exists()
