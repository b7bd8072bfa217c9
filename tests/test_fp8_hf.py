"""fp8 (e4m3fn, 128x128 block scales) through the HF format: dequantize with --dtype bf16,
quantize with --dtype fp8, keep fp8 through a reshard; judged by a torch reference and transformers."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import pyconv
from conftest import load_hf_tensors as hf_tensors

B = 128


def expand(scale, shape):
    return scale.repeat_interleave(B, 0).repeat_interleave(B, 1)[: shape[0], : shape[1]]


def quantize_reference(w):
    """DeepSeek's recipe: per 128x128 block, scale = max(amax, 1e-4) / 448, q = e4m3fn(w / scale)."""
    w = w.float()
    rows, cols = -(-w.shape[0] // B), -(-w.shape[1] // B)
    padded = torch.zeros(rows * B, cols * B)
    padded[: w.shape[0], : w.shape[1]] = w
    blocks = padded.view(rows, B, cols, B).abs().amax(dim=(1, 3))
    scale = torch.clamp(blocks, min=1e-4) / 448
    q = (w / expand(scale, w.shape)).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_reference(q, scale, dtype=torch.bfloat16):
    return (q.float() * expand(scale, q.shape)).to(dtype)


def is_quantized_name(name, t):
    leaf = name.rsplit(".", 2)[-2]
    return (t.dim() == 2 and ".layers." in name and name.endswith(".weight") and "norm" not in leaf
            and leaf not in ("gate", "shared_expert_gate"))




@pytest.fixture(scope="module")
def deepseek_fp8(tmp_path_factory):
    """A DeepSeek-V3-style checkpoint: fp8 linear weights with weight_scale_inv, bf16 elsewhere."""
    root = tmp_path_factory.mktemp("fp8")
    config = transformers.DeepseekV3Config(
        vocab_size=96, hidden_size=160, intermediate_size=288, moe_intermediate_size=136, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
        first_k_dense_replace=1, q_lora_rank=144, kv_lora_rank=130, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=16, n_group=2, topk_group=1, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    model.to(torch.bfloat16).save_pretrained(root / "bf16-source")
    state = hf_tensors(root / "bf16-source")  # per-expert names, as save_pretrained writes them
    quantized, reference = {}, {}
    for name, t in state.items():
        if is_quantized_name(name, t):
            q, s = quantize_reference(t)
            quantized[name], quantized[name + "_scale_inv"] = q, s
            reference[name] = dequantize_reference(q, s)
        else:
            quantized[name] = reference[name] = t
    src = root / "fp8"
    src.mkdir()
    save_file(quantized, src / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads(config.to_json_string())
    cfg.update(architectures=["DeepseekV3ForCausalLM"], dtype="bfloat16",
               quantization_config={"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                                    "activation_scheme": "dynamic"})
    (src / "config.json").write_text(json.dumps(cfg))
    return model, src, quantized, reference


def test_dequantize_to_bf16_equals_torch_and_loads(deepseek_fp8, tmp_path):
    model, src, quantized, reference = deepseek_fp8
    pyconv.reshard(src, tmp_path / "bf16", dtype="bf16", max_shard_size="300KB")
    out = hf_tensors(tmp_path / "bf16")
    assert not any(k.endswith("_scale_inv") for k in out) and out.keys() == reference.keys()
    for name, expected in reference.items():
        assert out[name].dtype == torch.bfloat16 and torch.equal(out[name].view(torch.int16), expected.view(torch.int16)), name
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    loaded, info = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "bf16", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    # The same weights dequantized by torch, saved the plain way, must give the same logits.
    expected_dir = tmp_path / "torch-dequantized"
    expected_dir.mkdir()
    save_file(reference, expected_dir / "model.safetensors", metadata={"format": "pt"})
    (expected_dir / "config.json").write_text((tmp_path / "bf16" / "config.json").read_text())
    expected = transformers.DeepseekV3ForCausalLM.from_pretrained(expected_dir)
    x = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x).logits, expected.eval()(x).logits)


def test_quantize_to_fp8_equals_deepseek_recipe(deepseek_fp8, tmp_path):
    _, src, quantized, _ = deepseek_fp8
    pyconv.reshard(src.parent / "bf16-source", tmp_path / "fp8", dtype="fp8", max_shard_size="200KB")
    out = hf_tensors(tmp_path / "fp8")
    assert out.keys() == quantized.keys()
    for name, expected in quantized.items():
        assert out[name].dtype == expected.dtype, name
        assert torch.equal(out[name].view(torch.uint8) if expected.dtype == torch.float8_e4m3fn else out[name],
                           expected.view(torch.uint8) if expected.dtype == torch.float8_e4m3fn else expected), name
    index = json.loads((tmp_path / "fp8" / "model.safetensors.index.json").read_text())["weight_map"]
    assert all(index[n + "_scale_inv"] == index[n] for n in quantized if n + "_scale_inv" in quantized)
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                                             "activation_scheme": "dynamic"}


def test_all_zero_block_quantizes_to_zeros(tmp_path):
    w = torch.randn(256, 256)
    w[:128, 128:] = 0
    src = tmp_path / "src"
    src.mkdir()
    save_file({"model.layers.0.mlp.down_proj.weight": w}, src / "model.safetensors")
    pyconv.reshard(src, tmp_path / "q", dtype="fp8")
    out = load_file(tmp_path / "q" / "model.safetensors")
    q, s = out["model.layers.0.mlp.down_proj.weight"], out["model.layers.0.mlp.down_proj.weight_scale_inv"]
    assert (q[:128, 128:].float() == 0).all() and s[0, 1] == torch.tensor(1e-4) / 448
    ref_q, ref_s = quantize_reference(w)
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)) and torch.equal(s, ref_s)


def test_fp8_kept_through_a_reshard(deepseek_fp8, tmp_path):
    _, src, quantized, _ = deepseek_fp8
    pyconv.reshard(src, tmp_path / "resharded", max_shard_size="150KB")
    out = hf_tensors(tmp_path / "resharded")
    assert out.keys() == quantized.keys()
    for name, t in quantized.items():
        assert torch.equal(out[name].view(torch.uint8), t.view(torch.uint8)), name
    assert "quantization_config" in json.loads((tmp_path / "resharded" / "config.json").read_text())


def test_fp8_without_scales_is_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    save_file({"model.layers.0.mlp.down_proj.weight": torch.zeros(4, 4, dtype=torch.float8_e4m3fn)},
              src / "model.safetensors")
    with pytest.raises(pyconv.LayoutError, match="without its weight_scale_inv"):
        pyconv.reshard(src, tmp_path / "out", dtype="bf16")


def test_routing_bias_stays_float32_through_a_cast(deepseek_fp8, tmp_path):
    """DeepSeek ships e_score_correction_bias in float32 and its fp8_cast_bf16.py keeps it so:
    rounded to bf16 it could send tokens to other experts. --dtype casts everything else."""
    _, src, quantized, reference = deepseek_fp8
    f32 = {n: (t.float() if n.endswith("e_score_correction_bias") else t) for n, t in quantized.items()}
    assert any(n.endswith("e_score_correction_bias") for n in f32)
    source = tmp_path / "f32-bias"
    source.mkdir()
    save_file(f32, source / "model.safetensors", metadata={"format": "pt"})
    (source / "config.json").write_text((src / "config.json").read_text())
    pyconv.reshard(source, tmp_path / "bf16", dtype="bf16")
    out = hf_tensors(tmp_path / "bf16")
    for name, t in out.items():
        if name.endswith("e_score_correction_bias"):
            assert t.dtype == torch.float32 and torch.equal(t, f32[name]), name
        else:
            assert t.dtype == torch.bfloat16 and torch.equal(t.view(torch.int16), reference[name].view(torch.int16)), name
    pyconv.reshard(source, tmp_path / "mp2", to="deepseek", tp=2, dtype="bf16")
    ds = hf_tensors(tmp_path / "mp2")
    biases = [t for n, t in ds.items() if n.endswith("ffn.gate.bias")]
    assert biases and all(t.dtype == torch.float32 for t in biases)
