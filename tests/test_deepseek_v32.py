"""DeepSeek-V3.2 (#18): DeepSeek-V3's table plus the DSA lightning indexer in every attention layer.
Megatron-Core 0.16.1 builds DeepSeek sparse attention with TransformerEngine only, so it cannot
run here: the indexer's names and shapes are checked against its DSA module (dsa.py), and the
conversions by round trips (bit for bit, the config as it was, transformers' logits on inputs
longer than index_topk, where the indexer decides what each query attends to) and by
DeepSeek-V3.2-Exp's convert.py algorithm (byte for byte)."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers
from safetensors.torch import save_file

import pyconv
from conftest import TOKENIZER_FILES, forget_hf_config, hf_logits, load_hf_tensors, round_trip
from pyconv.errors import LayoutError
from test_deepseek import REFERENCE_TABLE, assert_same_directory, reference_convert

# DeepSeek-V3.2-Exp's inference/convert.py table (@3b99a53) adds the indexer's keys to V3's.
V32_TABLE = {**REFERENCE_TABLE, "wq_b": ("wq_b", None), "wk": ("wk", None), "k_norm": ("k_norm", None),
             "weights_proj": ("weights_proj", None)}


@pytest.fixture(scope="module")
def v32(tmp_path_factory):
    torch.manual_seed(11)
    config = transformers.DeepseekV32Config(
        vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
        first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=16, max_position_embeddings=64, index_n_heads=2, index_head_dim=16, index_topk=8,
        n_group=2, topk_group=1, num_nextn_predict_layers=1)
    model = transformers.DeepseekV32ForCausalLM(config).eval()
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.dim() == 1 and ("norm" in name or "e_score_correction_bias" in name):
                t.copy_(torch.randn_like(t) * 0.1 + (1.0 if "norm" in name and "bias" not in name else 0.0))
    path = tmp_path_factory.mktemp("deepseek_v32") / "hf"
    model.save_pretrained(path, max_shard_size="200KB")
    # The MTP layer as released (layer 3 here, 61 in the real model): a decoder layer and its own tensors.
    tensors = load_hf_tensors(path)
    g = torch.Generator().manual_seed(5)
    mtp = {k.replace("model.layers.2.", "model.layers.3."): torch.randn(v.shape, generator=g)
           for k, v in tensors.items() if k.startswith("model.layers.2.")}
    mtp.update({f"model.layers.3.{leaf}": torch.randn(shape, generator=g) for leaf, shape in (
        ("enorm.weight", (64,)), ("hnorm.weight", (64,)), ("eh_proj.weight", (64, 128)),
        ("shared_head.norm.weight", (64,)))})
    mtp["model.layers.3.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    mtp["model.layers.3.shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    save_file(mtp, str(path / "model-mtp.safetensors"), metadata={"format": "pt"})
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"].update((k, "model-mtp.safetensors") for k in mtp)
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    for name, text in TOKENIZER_FILES.items():
        (path / name).write_text(text)
    return model, str(path)


def _ids():
    """24 positions: past index_topk (8), so the indexer picks what each query attends to."""
    return torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))


def _logits(path):
    model, info = transformers.DeepseekV32ForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"], info
    assert all(k.startswith("model.layers.3.") for k in info["unexpected_keys"])  # the MTP layer transformers drops
    return hf_logits(model.eval(), _ids())


@pytest.mark.parametrize("to, options", [("megatron", {"tp": 2, "ep": 2}), ("megatron", {"pp": 3}),
                                         ("torch_dist", {})])
def test_round_trip_is_bitwise_and_transformers_agrees(v32, tmp_path, to, options):
    model, src = v32
    back = round_trip(src, tmp_path, to, **options)
    assert torch.equal(_logits(back), hf_logits(model, _ids()))


def test_indexer_names_shapes_and_args_are_megatron_cores(v32, tmp_path):
    """Megatron-Core 0.16.1's DSAIndexer (dsa.py): linear_wq_b [n*d, q_lora_rank], linear_wk [d, H],
    k_norm (LayerNorm: weight, bias) [d], linear_weights_proj [n, H], 'duplicated' (whole on every
    tensor-parallel rank), under self_attention.core_attention.indexer; the MTP layer has its own."""
    _, src = v32
    pyconv.reshard(src, tmp_path / "meg", to="megatron", tp=2)
    for rank in ("mp_rank_00", "mp_rank_01"):
        state = torch.load(tmp_path / "meg" / "release" / rank / "model_optim_rng.pt", weights_only=False)
        shapes = {k: tuple(v.shape) for k, v in state["model"].items()}
        for prefix in ("decoder.layers.0.", "decoder.layers.2.", "mtp.layers.0.transformer_layer."):
            p = prefix + "self_attention.core_attention.indexer."
            assert {k[len(p):]: v for k, v in shapes.items() if k.startswith(p)} == {
                "linear_wq_b.weight": (32, 32), "linear_wk.weight": (16, 64), "k_norm.weight": (16,),
                "k_norm.bias": (16,), "linear_weights_proj.weight": (2, 64)}
        # TransformerEngine's MLA names, as the DSA spec builds them
        assert "decoder.layers.0.self_attention.linear_q_up_proj.layer_norm_weight" in shapes
    args = vars(state["args"])
    assert {k: args[k] for k in ("experimental_attention_variant", "dsa_indexer_n_heads", "dsa_indexer_head_dim",
                                 "dsa_indexer_topk", "multi_latent_attention", "mtp_num_layers")} == {
        "experimental_attention_variant": "dsa", "dsa_indexer_n_heads": 2, "dsa_indexer_head_dim": 16,
        "dsa_indexer_topk": 8, "multi_latent_attention": True, "mtp_num_layers": 1}
    # The indexer tensors on both ranks are the whole HF tensors, each where it belongs.
    hf = load_hf_tensors(src)
    for megatron, leaf in (("linear_wq_b.weight", "wq_b.weight"), ("linear_wk.weight", "wk.weight"),
                           ("k_norm.weight", "k_norm.weight"), ("k_norm.bias", "k_norm.bias"),
                           ("linear_weights_proj.weight", "weights_proj.weight")):
        assert torch.equal(state["model"][f"decoder.layers.1.self_attention.core_attention.indexer.{megatron}"],
                           hf[f"model.layers.1.self_attn.indexer.{leaf}"]), megatron


def test_local_naming_is_refused_by_name(v32, tmp_path):
    for to in ("megatron", "torch_dist"):
        with pytest.raises(LayoutError, match="builds DeepSeek sparse attention with TransformerEngine only"):
            pyconv.reshard(v32[1], tmp_path / to, to=to, megatron_naming="local")
        assert not (tmp_path / to).exists()


def test_megatron_to_hf_from_the_args_alone(v32, tmp_path):
    model, src = v32
    pyconv.reshard(src, tmp_path / "meg", to="megatron")
    forget_hf_config(tmp_path / "meg")
    pyconv.reshard(tmp_path / "meg", tmp_path / "hf", to="hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["architectures"], config["model_type"], config["index_topk"]) == (
        ["DeepseekV32ForCausalLM"], "deepseek_v32", 8)
    assert torch.equal(_logits(tmp_path / "hf"), hf_logits(model, _ids()))


@pytest.mark.parametrize("mp", [1, 2])
def test_deepseek_layout_is_convert_py_byte_for_byte(v32, tmp_path, mp, monkeypatch):
    import test_deepseek

    _, src = v32
    pyconv.reshard(src, tmp_path / "ours", to="deepseek", tp=mp)
    monkeypatch.setattr(test_deepseek, "REFERENCE_TABLE", V32_TABLE)
    reference_convert(src, tmp_path / "reference", 4, mp, mtp_layer=3)
    assert_same_directory(tmp_path / "ours", tmp_path / "reference")
    # and read back
    pyconv.reshard(tmp_path / "ours", tmp_path / "hf", to="hf")
    back = load_hf_tensors(tmp_path / "hf")
    want = {k: v for k, v in load_hf_tensors(src).items() if not k.startswith("model.layers.3.")}
    assert back.keys() == want.keys() and all(torch.equal(back[k], want[k]) for k in want)
    assert os.path.isfile(tmp_path / "ours" / "config.json")
