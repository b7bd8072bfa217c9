"""DeepSeek-V3's inference layout (`--to deepseek --tp N`): every output file byte for byte what
DeepSeek's inference/convert.py writes, judged by a reference of its algorithm written here with
torch and safetensors; read back to Hugging Face, judged by transformers."""

from __future__ import annotations

import json
import math
import os
import shutil
from glob import glob

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

import pyconv
from conftest import TOKENIZER_FILES, example_input
from pyconv.cli import main as cli_main
from pyconv.errors import FormatError, LayoutError
from pyconv.formats import detect_format, get_format
from pyconv.formats.deepseek import deepseek_name
from pyconv.io.safetensors import layout_like_save_file

N_LAYERS, N_EXPERTS = 3, 4


# ---- the reference: convert.py's algorithm ------------------------------------------------------

REFERENCE_TABLE = {
    "embed_tokens": ("embed", 0), "input_layernorm": ("attn_norm", None),
    "post_attention_layernorm": ("ffn_norm", None), "q_proj": ("wq", 0), "q_a_proj": ("wq_a", None),
    "q_a_layernorm": ("q_norm", None), "q_b_proj": ("wq_b", 0), "kv_a_proj_with_mqa": ("wkv_a", None),
    "kv_a_layernorm": ("kv_norm", None), "kv_b_proj": ("wkv_b", 0), "o_proj": ("wo", 1), "gate": ("gate", None),
    "gate_proj": ("w1", 0), "down_proj": ("w2", 1), "up_proj": ("w3", 0), "norm": ("norm", None),
    "lm_head": ("head", 0), "scale": ("scale", None),
}


def reference_name(name):
    """convert.py's renaming of one Hugging Face name: (new name, split dim)."""
    name = name.removeprefix("model.")
    for old, new in (("self_attn", "attn"), ("mlp", "ffn"), ("weight_scale_inv", "scale"),
                     ("e_score_correction_bias", "bias")):
        name = name.replace(old, new)
    key = name.split(".")[-2]
    assert key in REFERENCE_TABLE, key
    new_key, dim = REFERENCE_TABLE[key]
    return name.replace(key, new_key), dim


def reference_convert(hf_dir, save_dir, n_experts, mp, mtp_layer, cast=None):
    """What convert.py does (its hard-coded "model.layers.61" is `mtp_layer` here): every rank's
    state dict in memory, saved with safetensors' save_file; tokenizer files copied."""
    per_rank = n_experts // mp
    state_dicts = [{} for _ in range(mp)]
    for path in glob(os.path.join(hf_dir, "*.safetensors")):
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                if f"model.layers.{mtp_layer}" in name:
                    continue
                param = f.get_tensor(name)
                # A cast source as DeepSeek makes one (fp8_cast_bf16.py): the float32 routing bias stays so.
                if cast is not None and param.is_floating_point() and not name.endswith("e_score_correction_bias"):
                    param = param.to(cast)
                name, dim = reference_name(name)
                for rank in range(mp):
                    part = param
                    if "experts" in name and "shared_experts" not in name:
                        if int(name.split(".")[-3]) // per_rank != rank:
                            continue
                    elif dim is not None:
                        assert param.size(dim) % mp == 0
                        size = param.size(dim) // mp
                        part = param.narrow(dim, rank * size, size).contiguous()
                    state_dicts[rank][name] = part
    os.makedirs(save_dir, exist_ok=True)
    for rank in range(mp):
        save_file(state_dicts[rank], os.path.join(save_dir, f"model{rank}-mp{mp}.safetensors"))
    for path in glob(os.path.join(hf_dir, "*token*")):
        shutil.copyfile(path, os.path.join(save_dir, os.path.basename(path)))


def assert_same_directory(ours, reference):
    """convert.py's files byte for byte; beside them pyconv writes only the config it reads back with."""
    assert sorted(set(os.listdir(ours)) - {"config.json"}) == sorted(os.listdir(reference))
    assert "config.json" in os.listdir(ours)
    for name in os.listdir(reference):
        with open(os.path.join(ours, name), "rb") as a, open(os.path.join(reference, name), "rb") as b:
            assert a.read() == b.read(), f"{name} differs"


# ---- checkpoints -----------------------------------------------------------------------------------

def tiny_deepseek_config():
    return transformers.DeepseekV3Config(
        vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=N_LAYERS,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=N_EXPERTS, n_shared_experts=1,
        num_experts_per_tok=2, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=16, n_group=2, topk_group=1, max_position_embeddings=64)


def add_tensors_file(hf_dir, file_name, tensors):
    """Adds a safetensors file to a sharded Hugging Face checkpoint and lists it in the index."""
    save_file(tensors, os.path.join(hf_dir, file_name), metadata={"format": "pt"})
    index_path = os.path.join(hf_dir, "model.safetensors.index.json")
    index = json.load(open(index_path))
    index["weight_map"].update((name, file_name) for name in tensors)
    json.dump(index, open(index_path, "w"), indent=2)


def mtp_layer_tensors(layer_tensors, index, hidden, vocab, dtype):
    """A multi-token-prediction layer as DeepSeek-V3 stores it (model.layers.61.* there): a decoder
    layer plus embedding, norms, projection and head, whose keys are not in convert.py's table."""
    g = torch.Generator().manual_seed(index)
    out = {name.replace(f"layers.{N_LAYERS - 1}.", f"layers.{index}."): t.clone() for name, t in layer_tensors.items()}
    for name, shape in (("embed_tokens.weight", (vocab, hidden)), ("enorm.weight", (hidden,)),
                        ("hnorm.weight", (hidden,)), ("eh_proj.weight", (hidden, 2 * hidden)),
                        ("shared_head.norm.weight", (hidden,)), ("shared_head.head.weight", (vocab, hidden))):
        out[f"model.layers.{index}.{name}"] = torch.randn(shape, generator=g).to(dtype)
    return out


@pytest.fixture(scope="module")
def tiny_deepseek(tmp_path_factory):
    """(model, path): a DeepseekV3 from a config, saved in three shards, with an MTP layer
    `model.layers.3.*` in a file of its own and tokenizer stand-ins."""
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(tiny_deepseek_config()).eval()
    with torch.no_grad():  # non-trivial norms and router biases, so a mix-up cannot hide
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.dim() == 1 and ("norm" in name or "e_score_correction_bias" in name):  # not rotary inv_freq
                t.copy_(torch.randn_like(t) * 0.1 + (1.0 if "norm" in name else 0.0))
    path = str(tmp_path_factory.mktemp("deepseek") / "hf")
    model.save_pretrained(path, max_shard_size="150KB")
    assert len(glob(os.path.join(path, "model-*.safetensors"))) > 1
    last = {k: v for k, v in load_hf(path).items() if k.startswith(f"model.layers.{N_LAYERS - 1}.")}
    add_tensors_file(path, "model-mtp.safetensors", mtp_layer_tensors(last, N_LAYERS, 64, 96, torch.float32))
    for name, text in TOKENIZER_FILES.items():
        with open(os.path.join(path, name), "w") as f:
            f.write(text)
    return model, path


def quantize_fp8(weight, block=128):
    """DeepSeek's fp8 block quantization: W = fp8 * S per 128 x 128 block, S = weight_scale_inv."""
    rows, cols = weight.shape
    scale = torch.empty(math.ceil(rows / block), math.ceil(cols / block), dtype=torch.float32)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = weight[i * block:(i + 1) * block, j * block:(j + 1) * block].float()
            s = tile.abs().max().clamp(min=1e-12) / 448.0
            scale[i, j] = s
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (tile / s).to(torch.float8_e4m3fn)
    return q, scale


FP8_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "num_hidden_layers": 2,
    "n_routed_experts": N_EXPERTS, "hidden_size": 64, "vocab_size": 256,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}


def fp8_checkpoint_tensors():
    """A DeepSeek-V3-style fp8 checkpoint (not a runnable model): fp8 linear weights with float32
    weight_scale_inv, bf16 norms and embeddings, a float32 router bias, an int64 buffer, experts,
    and an MTP layer (layer 2 of 2)."""
    g = torch.Generator().manual_seed(7)
    out = {}

    def fp8(name, rows, cols):
        out[name + ".weight"], out[name + ".weight_scale_inv"] = quantize_fp8(torch.randn(rows, cols, generator=g))

    def bf16(name, *shape):
        out[name] = torch.randn(shape, generator=g).to(torch.bfloat16)

    bf16("model.embed_tokens.weight", 256, 64)
    for layer in (0, 1, 2):
        p = f"model.layers.{layer}"
        bf16(f"{p}.input_layernorm.weight", 64)
        bf16(f"{p}.post_attention_layernorm.weight", 64)
        fp8(f"{p}.self_attn.q_a_proj", 200, 64)       # replicated, partial blocks
        bf16(f"{p}.self_attn.q_a_layernorm.weight", 200)
        fp8(f"{p}.self_attn.q_b_proj", 256, 200)      # dim 0
        fp8(f"{p}.self_attn.kv_a_proj_with_mqa", 40, 64)
        bf16(f"{p}.self_attn.kv_a_layernorm.weight", 32)
        fp8(f"{p}.self_attn.kv_b_proj", 256, 32)
        fp8(f"{p}.self_attn.o_proj", 64, 256)         # dim 1
        if layer == 0:
            fp8(f"{p}.mlp.gate_proj", 256, 64)
            fp8(f"{p}.mlp.up_proj", 256, 64)
            fp8(f"{p}.mlp.down_proj", 64, 256)
        else:
            bf16(f"{p}.mlp.gate.weight", N_EXPERTS, 64)
            out[f"{p}.mlp.gate.e_score_correction_bias"] = torch.randn(N_EXPERTS, generator=g)
            out[f"{p}.mlp.gate.tid2eid"] = torch.randint(0, N_EXPERTS, (8, 2), generator=g)
            for e in range(N_EXPERTS):
                fp8(f"{p}.mlp.experts.{e}.gate_proj", 32, 64)
                fp8(f"{p}.mlp.experts.{e}.up_proj", 32, 64)
                fp8(f"{p}.mlp.experts.{e}.down_proj", 64, 32)
            fp8(f"{p}.mlp.shared_experts.gate_proj", 256, 64)
            fp8(f"{p}.mlp.shared_experts.up_proj", 256, 64)
            fp8(f"{p}.mlp.shared_experts.down_proj", 64, 256)
    for name in ("enorm.weight", "hnorm.weight"):
        bf16(f"model.layers.2.{name}", 64)
    fp8("model.layers.2.eh_proj", 64, 128)
    bf16("model.norm.weight", 64)
    bf16("lm_head.weight", 256, 64)
    return out


def write_hf(path, tensors, config, files=2):
    """A sharded Hugging Face checkpoint of these tensors, written with safetensors."""
    os.makedirs(path, exist_ok=True)
    names = sorted(tensors)
    weight_map = {}
    for i in range(files):
        file_name = f"model-{i + 1:05d}-of-{files:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::files]}
        save_file(part, os.path.join(path, file_name), metadata={"format": "pt"})
        weight_map.update((n, file_name) for n in part)
    json.dump({"metadata": {}, "weight_map": weight_map}, open(os.path.join(path, "model.safetensors.index.json"), "w"))
    json.dump(config, open(os.path.join(path, "config.json"), "w"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        f.write(TOKENIZER_FILES["tokenizer_config.json"])
    return str(path)


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    tensors = fp8_checkpoint_tensors()
    return tensors, write_hf(tmp_path_factory.mktemp("fp8") / "hf", tensors, FP8_CONFIG)


def load_hf(path):
    tensors = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), framework="pt") as f:
                tensors.update((k, f.get_tensor(k)) for k in f.keys())
    return tensors


def bits(t):
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_bitwise(expected, actual):
    assert sorted(expected) == sorted(actual)
    for name, t in expected.items():
        assert actual[name].dtype == t.dtype and actual[name].shape == t.shape, name
        assert torch.equal(bits(actual[name]), bits(t)), name


def without_layer(tensors, layer):
    return {k: v for k, v in tensors.items() if not k.startswith(f"model.layers.{layer}.")}


# ---- safetensors' own layout ------------------------------------------------------------------------

def test_layout_like_save_file_matches_safetensors(tmp_path):
    dtypes = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "BF16": torch.bfloat16, "F16": torch.float16,
              "F32": torch.float32, "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
              "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32,
              "U64": torch.uint64}
    g = torch.Generator().manual_seed(3)
    for case in range(3):
        tensors = {}
        for i, (name, dtype) in enumerate(dtypes.items()):
            for j in range(2):
                shape = (int(torch.randint(1, 4, (1,), generator=g)), 3)[: 1 + (i + j + case) % 2]
                tensors[f"t.{(i * 7 + j * 3 + case) % 11}.{name.lower()}{j}"] = torch.zeros(shape, dtype=dtype)
        tensors["empty"] = torch.zeros(0, 5)
        path = tmp_path / f"case{case}.safetensors"
        metadata = ({"format": "pt"}, None, {})[case]
        save_file(tensors, path, metadata=metadata)
        data = path.read_bytes()
        reverse = {v: k for k, v in dtypes.items()}
        header, entries = layout_like_save_file([(n, reverse[t.dtype], tuple(t.shape)) for n, t in tensors.items()],
                                                metadata)
        assert data[:len(header)] == header
        assert len(data) == len(header) + entries[-1][4]


def test_names_follow_convert_py_replace_all_included():
    names = list(fp8_checkpoint_tensors()) + [
        # contrived: convert.py's str.replace rewrites every occurrence, not just the component
        "model.layers.0.self_attn.q_proj_lora.q_proj.weight",   # -> layers.0.attn.wq_lora.wq.weight
        "model.layers.0.my_mlp.self_attn_x.o_proj.bias",         # -> layers.0.my_ffn.attn_x.wo.bias
        "model.up_proj.experts.7.up_proj.weight_scale_inv",      # -> w3.experts.7.w3.scale
    ]
    for name in names:
        if ".layers.2." not in name:
            assert deepseek_name(name)[0] == reference_name(name)[0], name
    assert deepseek_name(names[-3])[0] == "layers.0.attn.wq_lora.wq.weight"
    assert deepseek_name(names[-1])[0] == "w3.experts.7.w3.scale"


# ---- writing: byte for byte convert.py ----------------------------------------------------------

@pytest.mark.parametrize("mp", [1, 2, 4])
def test_output_is_convert_py_byte_for_byte(tiny_deepseek, tmp_path, mp):
    _, src = tiny_deepseek
    report = pyconv.reshard(src, tmp_path / "ours", to="deepseek", tp=mp)
    reference_convert(src, tmp_path / "reference", N_EXPERTS, mp, mtp_layer=N_LAYERS)
    assert_same_directory(tmp_path / "ours", tmp_path / "reference")
    assert report.files == mp + len(TOKENIZER_FILES) + 1
    source_config = json.load(open(os.path.join(src, "config.json")))
    assert source_config["num_nextn_predict_layers"] == 1  # the MTP layer convert.py drops...
    assert json.load(open(tmp_path / "ours" / "config.json")) == {**source_config, "num_nextn_predict_layers": 0}
    mtp = sum(name.startswith(f"model.layers.{N_LAYERS}.") for name in load_hf(src))
    assert report.plan.notes[-1].startswith(f"{mtp} tensors of the multi-token-prediction layers (layers >= "
                                            f"num_hidden_layers = {N_LAYERS}) dropped")


@pytest.mark.parametrize("mp", [1, 2])
def test_fp8_output_is_convert_py_byte_for_byte(fp8_checkpoint, tmp_path, mp):
    _, src = fp8_checkpoint
    pyconv.reshard(src, tmp_path / "ours", to="deepseek", tp=mp)
    reference_convert(src, tmp_path / "reference", N_EXPERTS, mp, mtp_layer=2)
    assert_same_directory(tmp_path / "ours", tmp_path / "reference")
    with safe_open(tmp_path / "ours" / f"model0-mp{mp}.safetensors", framework="pt") as f:
        assert f.get_slice("layers.0.attn.wq_b.scale").get_shape() == [2 // mp, 2]
        assert f.get_slice("layers.0.attn.wo.scale").get_shape() == [1, 2 // mp]
        assert f.get_slice("layers.0.attn.wq_b.weight").get_dtype() == "F8_E4M3"


def test_cli_with_a_cast_matches_convert_py_on_a_cast_source(tiny_deepseek, tmp_path):
    _, src = tiny_deepseek
    assert cli_main(["reshard", src, str(tmp_path / "ours"), "--to", "deepseek", "--tp", "2", "--dtype", "bf16"]) == 0
    reference_convert(src, tmp_path / "reference", N_EXPERTS, 2, mtp_layer=N_LAYERS, cast=torch.bfloat16)
    assert_same_directory(tmp_path / "ours", tmp_path / "reference")


def test_plan_reads_nothing_and_splits_columns_with_one_strided_copy(tiny_deepseek):
    _, src = tiny_deepseek
    plan = pyconv.api.plan_reshard(src, to="deepseek", tp=2)
    assert [f.path for f in plan.files if f.kind == "weights"] == ["model0-mp2.safetensors", "model1-mp2.safetensors"]
    wo = next(t for t in plan.files[1].tensors if t.name == "layers.0.attn.wo.weight")
    assert wo.shape == (64, 32)
    (copy,) = wo.copies
    source = pyconv.open(src).catalog.tensors["model.layers.0.self_attn.o_proj.weight"].blocks[0].stored
    assert (copy.src_offset, copy.src_row_stride, copy.rows, copy.cols) == (source.offset + 32 * 4, 64 * 4, 64, 32)
    experts = {t.name for t in plan.files[1].tensors if ".experts." in t.name}
    assert experts == {f"layers.{layer}.ffn.experts.{e}.w{k}.weight" for layer in (1, 2) for e in (2, 3) for k in (1, 2, 3)}
    assert not any(".layers.3." in t.name or t.name.startswith("layers.3.") for f in plan.files for t in f.tensors)


# ---- reading back -----------------------------------------------------------------------------------

def test_round_trip_to_hf_is_bitwise_and_transformers_loads_it(tiny_deepseek, tmp_path):
    model, src = tiny_deepseek
    pyconv.reshard(src, tmp_path / "ds", to="deepseek", tp=2)  # read back as written: no file copied by hand
    assert detect_format(str(tmp_path / "ds")).name == "deepseek"
    ckpt = pyconv.open(tmp_path / "ds")
    assert (ckpt.format, ckpt.architecture, ckpt.summary()["tp"]) == ("deepseek", "DeepseekV3ForCausalLM", 2)
    pyconv.reshard(tmp_path / "ds", tmp_path / "hf", to="hf")
    assert_bitwise(without_layer(load_hf(src), N_LAYERS), load_hf(tmp_path / "hf"))
    for name in TOKENIZER_FILES:
        assert open(tmp_path / "hf" / name).read() == TOKENIZER_FILES[name]
    loaded = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = example_input(model)
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)


def test_fp8_round_trip_to_hf_is_bitwise(fp8_checkpoint, tmp_path):
    tensors, src = fp8_checkpoint
    pyconv.reshard(src, tmp_path / "ds", to="deepseek", tp=2)
    pyconv.reshard(tmp_path / "ds", tmp_path / "hf", to="hf")
    assert_bitwise(without_layer(tensors, 2), load_hf(tmp_path / "hf"))


def test_relayout_mp4_to_mp2_equals_convert_py_mp2(tiny_deepseek, tmp_path):
    _, src = tiny_deepseek
    pyconv.reshard(src, tmp_path / "mp4", to="deepseek", tp=4)
    pyconv.reshard(tmp_path / "mp4", tmp_path / "mp2", to="deepseek", tp=2)
    reference_convert(src, tmp_path / "reference", N_EXPERTS, 2, mtp_layer=N_LAYERS)
    assert_same_directory(tmp_path / "mp2", tmp_path / "reference")


def test_detection_keeps_formats_apart(tiny_deepseek, tmp_path):
    _, src = tiny_deepseek
    pyconv.reshard(src, tmp_path / "ds", to="deepseek", tp=2)
    deepseek, hf, megatron = get_format("deepseek"), get_format("hf"), get_format("megatron")
    assert deepseek.detect(str(tmp_path / "ds")) and not hf.detect(str(tmp_path / "ds"))
    assert not megatron.detect(str(tmp_path / "ds"))
    assert not deepseek.detect(src) and detect_format(src).name == "hf"
    (tmp_path / "megatron" / "release").mkdir(parents=True)
    (tmp_path / "megatron" / "latest_checkpointed_iteration.txt").write_text("release")
    assert not deepseek.detect(str(tmp_path / "megatron"))
    assert not deepseek.detect(str(tmp_path / "ds" / "model0-mp2.safetensors"))


def test_reading_what_convert_py_wrote_needs_a_config(tiny_deepseek, tmp_path):
    _, src = tiny_deepseek
    reference_convert(src, tmp_path / "ds", N_EXPERTS, 2, mtp_layer=N_LAYERS)
    with pytest.raises(FormatError, match="needs the model's config.json to name the architecture: copy"):
        pyconv.open(tmp_path / "ds")
    with pytest.raises(FormatError, match="config.json"):
        pyconv.reshard(tmp_path / "ds", tmp_path / "hf", to="hf")
    assert not os.path.exists(tmp_path / "hf")


def test_broken_deepseek_directories_are_refused(tiny_deepseek, tmp_path):
    _, src = tiny_deepseek
    ds = tmp_path / "ds"
    pyconv.reshard(src, ds, to="deepseek", tp=2)
    os.rename(ds / "model1-mp2.safetensors", ds / "model1-mp4.safetensors")
    with pytest.raises(FormatError, match="several model-parallel sizes"):
        pyconv.open(ds)
    os.remove(ds / "model1-mp4.safetensors")
    with pytest.raises(FormatError, match="model1-mp2.safetensors is missing"):
        pyconv.open(ds)
    save_file({"layers.0.attn.wk.weight": torch.zeros(2)}, ds / "model1-mp2.safetensors")
    with pytest.raises(FormatError, match="'layers.0.attn.wk.weight' is not a DeepSeek inference name"):
        pyconv.open(ds)


# ---- impossible layouts -----------------------------------------------------------------------------

def test_experts_must_divide_among_the_ranks(tiny_deepseek, tmp_path):
    _, src = tiny_deepseek
    with pytest.raises(LayoutError, match="n_routed_experts 4 does not divide into 3 model-parallel ranks"):
        pyconv.reshard(src, tmp_path / "out", to="deepseek", tp=3)
    assert not os.path.exists(tmp_path / "out")


def small_hf(path, tensors, **config):
    return write_hf(path, tensors, {"architectures": ["DeepseekV3ForCausalLM"], "num_hidden_layers": 1,
                                    "n_routed_experts": 4, **config}, files=1)


def test_a_dim_that_does_not_divide_names_the_numbers(tmp_path):
    src = small_hf(tmp_path / "src", {"model.embed_tokens.weight": torch.zeros(10, 4)})
    with pytest.raises(LayoutError, match=r"model.embed_tokens.weight \(embed.weight\): dim 0 of size 10 does not "
                                          r"divide into 4 model-parallel parts"):
        pyconv.reshard(src, tmp_path / "out", to="deepseek", tp=4)


def test_unknown_keys_and_stray_experts_are_refused(tmp_path):
    src = small_hf(tmp_path / "src", {"model.layers.0.self_attn.k_proj.weight": torch.zeros(4, 4)})
    with pytest.raises(LayoutError, match="model.layers.0.self_attn.k_proj.weight: DeepSeek's mapping table has no "
                                          "entry for its key 'k_proj'"):
        pyconv.reshard(src, tmp_path / "out", to="deepseek", tp=1)
    src = small_hf(tmp_path / "src2", {"model.layers.0.mlp.experts.4.up_proj.weight": torch.zeros(4, 4)})
    with pytest.raises(LayoutError, match="expert 4 is outside n_routed_experts 4"):
        pyconv.reshard(src, tmp_path / "out", to="deepseek", tp=2)
    src = small_hf(tmp_path / "src3", {"model.norm.weight": torch.zeros(4)})
    os.remove(os.path.join(src, "config.json"))
    with pytest.raises(LayoutError, match="needs the model's config.json"):
        pyconv.reshard(src, tmp_path / "out", to="deepseek", tp=1)


def test_fp8_cut_inside_a_scale_block_needs_dequantizing(fp8_checkpoint, tmp_path):
    tensors, src = fp8_checkpoint
    with pytest.raises(LayoutError, match="holds 64 of 256, not a multiple of the 128-wide fp8 scale blocks.*convert with dtype bf16"):
        pyconv.reshard(src, tmp_path / "out", to="deepseek", tp=4)
    assert not os.path.exists(tmp_path / "out")
    # With --dtype bf16 the weights are dequantized (fp32 math, one rounding) and the scales dropped:
    # the same as convert.py on a checkpoint torch dequantized first.
    dequantized = {}
    for name, t in tensors.items():
        if name.endswith("_scale_inv"):
            continue
        scale = tensors.get(name + "_scale_inv")
        if scale is not None:
            grid = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[: t.shape[0], : t.shape[1]]
            t = (t.float() * grid).to(torch.bfloat16)
        elif t.dtype == torch.float32 and not name.endswith("e_score_correction_bias"):  # kept, as DeepSeek keeps it
            t = t.to(torch.bfloat16)
        dequantized[name] = t
    plain = write_hf(tmp_path / "dequantized", dequantized, {k: v for k, v in FP8_CONFIG.items()
                                                               if k != "quantization_config"})
    reference_convert(plain, tmp_path / "reference", N_EXPERTS, 4, mtp_layer=2)
    pyconv.reshard(src, tmp_path / "ours", to="deepseek", tp=4, dtype="bf16")
    assert_same_directory(tmp_path / "ours", tmp_path / "reference")
    with pytest.raises(LayoutError, match="keeps the source's fp8 weights"):
        pyconv.reshard(src, tmp_path / "x", to="deepseek", tp=2, dtype="fp8")

def test_a_family_the_layout_does_not_cover_is_refused_by_name(tmp_path):
    """Llama through convert.py's table would fail on k_proj; pyconv says why before that."""
    from test_output_hashes import make_source

    src = make_source("llama", tmp_path / "src")
    with pytest.raises(LayoutError, match=r"inference layout holds DeepSeek models \(deepseek_v3, deepseek_v2, deepseek_v32\), "
                                          r"not LlamaForCausalLM \(the llama family\)"):
        pyconv.reshard(src, tmp_path / "ds", to="deepseek", tp=2)
    assert not (tmp_path / "ds").exists()
