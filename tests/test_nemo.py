"""NeMo 2 checkpoint directories (weights/ + context/) and NeMo 1 key names.

NeMo itself does not install here; its two halves are judged by what it is built on:
- weights/: Megatron-Core saves a GPTModel's sharded state dict under NeMo's `module.` prefix
  (what NeMo's MegatronParallel passes) and pyconv converts it to HF with transformers' logits;
  Megatron-Core loads pyconv's weights/ under that prefix with transformers' logits.
- context/io.json: fiddle (NeMo's serializer) writes a TrainerContext of stand-ins registered
  under NeMo's module and class names, and pyconv reads the model config from it; fiddle loads
  the io.json pyconv writes back into those stand-ins with every field pyconv set.
Round trips HF -> NeMo -> HF are bit for bit, with the config from the HF config.json pyconv keeps
in the tokenizer artifact or, without it, from io.json alone.
"""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import pytest

import megatron_harness as mh
from conftest import example_input, load_hf_tensors
from test_torch_dist import hf_logits, megatron_save
from test_torch_dist_moe import _config as moe_config
from test_torch_dist_moe import assert_hf_output

ATOL = 1e-5
needs_megatron = pytest.mark.skipif(not mh.megatron_available(), reason="megatron-core is not installed")
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]
FAMILIES = ("llama", "gpt2", "qwen2", "mixtral")


@pytest.fixture(scope="module")
def models(tiny_models, tmp_path_factory):
    """{family: (model, HF dir)}: the conftest models and a tiny Mixtral."""
    import torch
    import transformers

    torch.manual_seed(3)
    mixtral = transformers.AutoModelForCausalLM.from_config(moe_config("mixtral")).eval()
    path = tmp_path_factory.mktemp("nemo_models") / "mixtral"
    mixtral.save_pretrained(path)
    return {**tiny_models, "mixtral": (mixtral, str(path))}


@pytest.fixture(scope="module")
def pyconv_nemo(models, tmp_path_factory):
    import pyconv

    root = tmp_path_factory.mktemp("pyconv_nemo")
    for family, (_, src) in models.items():
        pyconv.reshard(src, root / family, to="nemo", megatron_naming="local" if family == "mixtral" else "te")
    return root


def without_hf_config(ckpt: Path, tmp_path: Path) -> Path:
    """A copy whose model config can only come from context/io.json."""
    copy = tmp_path / f"{ckpt.name}_io_json_only"
    shutil.copytree(ckpt, copy)
    (copy / "context" / "nemo_tokenizer" / "config.json").unlink()
    return copy


# ---- NeMo 1 / NeMo 2 key names ------------------------------------------------------------------

@pytest.mark.parametrize("nemo, mcore", [
    # NeMo 2: the Megatron-Core names under MegatronParallel's module. prefix
    ("module.decoder.layers.self_attention.linear_qkv.weight", "decoder.layers.self_attention.linear_qkv.weight"),
    ("module.embedding.word_embeddings.weight", "embedding.word_embeddings.weight"),
    ("module.decoder.layers.mlp.experts.experts.linear_fc1.weight",
     "decoder.layers.mlp.experts.experts.linear_fc1.weight"),
    # NeMo 1 Megatron-Core models: model. prefix
    ("model.decoder.layers.3.mlp.linear_fc1.layer_norm_weight", "decoder.layers.3.mlp.linear_fc1.layer_norm_weight"),
    # NeMo 1 pre-Megatron-Core models (BioNeMo's nemo1 -> nemo2 mapping, GPT's encoder stack -> decoder)
    ("model.language_model.embedding.word_embeddings.weight", "embedding.word_embeddings.weight"),
    ("model.language_model.embedding.position_embeddings.weight", "embedding.position_embeddings.weight"),
    ("model.language_model.encoder.layers.0.self_attention.query_key_value.weight",
     "decoder.layers.0.self_attention.linear_qkv.weight"),
    ("model.language_model.encoder.layers.11.self_attention.dense.bias",
     "decoder.layers.11.self_attention.linear_proj.bias"),
    ("model.language_model.encoder.layers.2.mlp.dense_h_to_4h.weight", "decoder.layers.2.mlp.linear_fc1.weight"),
    ("model.language_model.encoder.layers.2.mlp.dense_4h_to_h.bias", "decoder.layers.2.mlp.linear_fc2.bias"),
    ("model.language_model.encoder.layers.5.post_attention_layernorm.weight",
     "decoder.layers.5.pre_mlp_layernorm.weight"),
    ("model.language_model.encoder.layers.5.input_layernorm.bias", "decoder.layers.5.input_layernorm.bias"),
    ("model.language_model.encoder.final_layernorm.weight", "decoder.final_layernorm.weight"),
    ("model.language_model.output_layer.weight", "output_layer.weight"),
    ("model.lm_head.weight", "output_layer.weight"),
])
def test_nemo_key_names(nemo, mcore):
    from pyconv.formats.nemo import nemo_to_mcore_key

    assert nemo_to_mcore_key(nemo) == mcore


# ---- round trips ----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_hf_nemo_hf_roundtrip(models, pyconv_nemo, tmp_path, family):
    import pyconv

    model, src = models[family]
    ckpt = pyconv_nemo / family
    assert sorted(p.name for p in ckpt.iterdir()) == ["context", "weights"]
    assert {".metadata", "__0_0.distcp", "common.pt", "metadata.json"} <= {p.name for p in (ckpt / "weights").iterdir()}
    info = pyconv.open(ckpt).summary()
    assert (info["format"], info["family"], info["key_style"]) == ("nemo", family, "nemo2")
    assert info["padded_vocab_size"] == 96  # NeMo's importers do not pad the vocabulary
    pyconv.reshard(ckpt, tmp_path / "hf", to="hf")
    assert_hf_output(model, src, tmp_path / "hf")
    original = json.loads((Path(src) / "config.json").read_text())
    assert json.loads((tmp_path / "hf" / "config.json").read_text()) == original
    if family != "mixtral":  # the conftest models carry tokenizer files
        assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == (Path(src) / "tokenizer.json").read_bytes()

    # The same from io.json alone: every tensor, and the config fields that define the model.
    bare = without_hf_config(ckpt, tmp_path)
    assert pyconv.open(bare).summary()["config_from"] == "context/io.json"
    pyconv.reshard(bare, tmp_path / "hf2", to="hf")
    assert_hf_output(model, src, tmp_path / "hf2")


def test_dcp_keys_carry_the_module_prefix(pyconv_nemo):
    from pyconv.io.dcp import read_metadata

    md = read_metadata(str(pyconv_nemo / "llama" / "weights"))
    assert md.tensors and all(k.startswith("module.") for k in md.tensors)
    assert "module.decoder.layers.self_attention.linear_qkv.weight" in md.tensors
    assert "module.decoder.layers.mlp.linear_fc1._extra_state/shard_0_6" in md.byte_items
    assert md.tensors["module.embedding.word_embeddings.weight"].size == (96, 64)


def test_metadata_with_megatron_core_0_14_save_plans_is_read(pyconv_nemo, tmp_path, monkeypatch):
    """Megatron-Core <= 0.14 (NeMo 2.x) keeps its save plans in `.metadata` as its own frozen
    SavePlan subclass, `megatron.core.dist_checkpointing.strategies.torch.MCoreSavePlan` (seen in
    NeMo 2.5's own HF import): pyconv reads such metadata and reports the same tensors."""
    import dataclasses
    import pickle
    from typing import Any, Optional

    from torch.distributed.checkpoint.planner import SavePlan

    from pyconv.io.dcp import read_metadata

    module = types.ModuleType("megatron.core.dist_checkpointing.strategies.torch")

    @dataclasses.dataclass(frozen=True)
    class MCoreSavePlan(SavePlan):
        mcore_data: Optional[dict[str, dict[str, Any]]] = None

    MCoreSavePlan.__module__, MCoreSavePlan.__qualname__ = module.__name__, "MCoreSavePlan"
    module.MCoreSavePlan = MCoreSavePlan
    monkeypatch.setitem(sys.modules, module.__name__, module)
    weights = tmp_path / "weights"
    shutil.copytree(pyconv_nemo / "llama" / "weights", weights)
    metadata = pickle.loads((weights / ".metadata").read_bytes())
    metadata.all_local_plans = [MCoreSavePlan(items=[], mcore_data={"module.embedding.word_embeddings.weight": {
        "nd_reformulated_orig_global_shape": None}})]
    data = pickle.dumps(metadata)
    assert b"MCoreSavePlan" in data
    (weights / ".metadata").write_bytes(data)
    before, after = read_metadata(str(pyconv_nemo / "llama" / "weights")), read_metadata(str(weights))
    assert after.tensors.keys() == before.tensors.keys()
    assert all(after.tensors[k].size == t.size and after.tensors[k].dtype == t.dtype for k, t in before.tensors.items())


def test_cli_writes_nemo_bf16(models, tmp_path):
    import pyconv
    from pyconv.cli import main

    assert main(["reshard", models["llama"][1], str(tmp_path / "nemo"), "--to", "nemo", "--dtype", "bf16"]) == 0
    ckpt = pyconv.open(tmp_path / "nemo")
    assert {ckpt.dtype(n) for n in ckpt.keys()} == {"BF16"}
    yaml_text = (tmp_path / "nemo" / "context" / "model.yaml").read_text()
    assert "bf16: true" in yaml_text and "_target_: torch.bfloat16" in yaml_text


def test_model_yaml_alone_gives_the_config(pyconv_nemo, tmp_path):
    """Without io.json (and without the HF config), model.yaml describes the model."""
    import pyconv

    pytest.importorskip("yaml")
    bare = without_hf_config(pyconv_nemo / "qwen2", tmp_path)
    (bare / "context" / "io.json").unlink()
    from_yaml = pyconv.open(bare)
    assert from_yaml.summary()["config_from"] == "context/model.yaml"
    assert from_yaml.config == pyconv.open(without_hf_config(pyconv_nemo / "qwen2", tmp_path / "b")).config


# ---- fiddle: NeMo's serializer of context/io.json -----------------------------------------------------

class _StandIn:
    """Any NeMo class: takes its arguments as keywords."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs


NEMO_CLASSES = {"nemo.collections.llm.gpt.model.llama": ("LlamaModel", "LlamaConfig", "Llama31Config"),
                "nemo.collections.llm.gpt.model.qwen2": ("Qwen2Model", "Qwen2Config"),
                "nemo.collections.llm.gpt.model.mixtral": ("MixtralModel", "MixtralConfig"),
                "nemo.collections.llm.gpt.model.base": ("GPTModel", "GPTConfig"),
                "nemo.collections.llm.gpt.model.gemma2": ("Gemma2Model", "Gemma2Config"),
                "nemo.collections.llm.gpt.model.gemma3": ("Gemma3Model", "Gemma3Config1B"),
                "nemo.collections.llm.gpt.model.phi3mini": ("Phi3Model", "Phi3Config"),
                "nemo.collections.common.tokenizers.huggingface.auto_tokenizer": ("AutoTokenizer",),
                "nemo.lightning.io.pl": ("TrainerContext",),
                "nemo.lightning.pytorch.trainer": ("Trainer",),
                "nemo.lightning.pytorch.strategies.megatron_strategy": ("MegatronStrategy",)}


@pytest.fixture
def nemo_stand_ins(monkeypatch):
    """NeMo's modules and classes as stand-ins (fiddle imports what a pyref names), and the torch
    dtypes registered as fiddle constants, as NeMo's fdl_torch does."""
    fiddle = pytest.importorskip("fiddle")
    from fiddle._src.experimental import serialization

    for module, names in NEMO_CLASSES.items():
        parts = module.split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            if name not in sys.modules:
                monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
        for cls_name in names:
            cls = type(cls_name, (_StandIn,), {"__module__": module, "__qualname__": cls_name})
            monkeypatch.setattr(sys.modules[module], cls_name, cls, raising=False)
    activation = "nemo.collections.llm.fn.activation"  # NeMo's openai_gelu, Gemma's activation
    for i in range(1, activation.count(".") + 2):
        name = ".".join(activation.split(".")[:i])
        if name not in sys.modules:
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setattr(sys.modules[activation], "openai_gelu", lambda x: x, raising=False)
    for dtype in ("float32", "bfloat16", "float16"):
        serialization.register_constant("torch", dtype, compare_by_identity=True)
    return fiddle, serialization


@pytest.mark.parametrize("rope, nemo_class, fields", [
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192}, "Llama31Config",
     {"scale_factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "old_context_len": 8192}),
    ({"rope_type": "linear", "factor": 4.0}, "LlamaConfig", {"seq_len_interpolation_factor": 4.0}),
])
def test_llama_rope_scaling_is_nemos_both_ways(nemo_stand_ins, tmp_path, rope, nemo_class, fields):
    """Llama 3.x rope scaling is NeMo's Llama31Config (scale_factor...), linear scaling GPTConfig's
    seq_len_interpolation_factor; read back from io.json alone they give the same HF rope."""
    import torch
    import transformers

    import pyconv
    from conftest import hf_logits

    fdl, serialization = nemo_stand_ins
    torch.manual_seed(1)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      rope_parameters={**rope, "rope_theta": 500000.0})
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharp attention, so that the scaled rope moves the logits
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(12.0)
            layer.self_attn.k_proj.weight.mul_(12.0)
    model.save_pretrained(tmp_path / "hf")
    pyconv.reshard(tmp_path / "hf", tmp_path / "nemo", to="nemo")
    c = serialization.load_json((tmp_path / "nemo" / "context" / "io.json").read_text()).model.config
    assert fdl.get_callable(c).__qualname__ == nemo_class
    assert {k: getattr(c, k) for k in fields} == fields
    back = tmp_path / "back"
    pyconv.reshard(without_hf_config(tmp_path / "nemo", tmp_path), back, to="hf")
    assert json.loads((back / "config.json").read_text())["rope_parameters"] == {**rope, "rope_theta": 500000.0}
    ids = torch.randint(0, 96, (2, 64), generator=torch.Generator().manual_seed(1))
    assert torch.equal(hf_logits(transformers.LlamaForCausalLM.from_pretrained(back).eval(), ids),
                       hf_logits(model, ids))


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_fiddle_loads_the_gemma_io_json_and_the_weights_come_back(nemo_stand_ins, tmp_path, family):
    """Gemma's NeMo 2 config as NeMo 2.5's classes take it (window, caps, two rope bases, the
    interleaved pattern; tuples where NeMo's fields are tuples) and HF -> NeMo -> HF bit for bit.
    NeMo itself judges these in tests/test_nemo_real.py."""
    import torch
    import transformers

    import pyconv
    from conftest import nontrivial_vectors

    fdl, serialization = nemo_stand_ins
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, max_position_embeddings=64, sliding_window=8, query_pre_attn_scalar=24)
    torch.manual_seed(0)
    if family == "gemma2":
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
            num_hidden_layers=2, attn_logit_softcapping=4.0, final_logit_softcapping=2.0, **common))
    else:
        model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
            num_hidden_layers=6, layer_types=(["sliding_attention"] * 2 + ["full_attention"]) * 2,
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                             "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}},
            **common))
    nontrivial_vectors(model).save_pretrained(tmp_path / "hf")
    pyconv.reshard(tmp_path / "hf", tmp_path / "nemo", to="nemo")
    c = serialization.load_json((tmp_path / "nemo" / "context" / "io.json").read_text()).model.config
    assert c.layernorm_zero_centered_gamma and c.gated_linear_unit and c.kv_channels == 16
    assert c.activation_func is sys.modules["nemo.collections.llm.fn.activation"].openai_gelu
    if family == "gemma2":
        assert fdl.get_callable(c).__qualname__ == "Gemma2Config"
        assert (c.window_size, c.query_pre_attn_scalar, c.attn_logit_softcapping, c.final_logit_softcapping) == (
            (8, 0), 24, 4.0, 2.0)
    else:
        assert fdl.get_callable(c).__qualname__ == "Gemma3Config1B"
        assert (c.rotary_base, c.window_size, c.interleaved_attn_pattern, c.rope_scaling_factor) == (
            (100.0, 10000.0), 8, (2, 1), 4.0)
        assert c.qk_layernorm and c.softmax_scale == 24 ** -0.5 and c.is_vision_language is False
    pyconv.reshard(tmp_path / "nemo", tmp_path / "back", to="hf")
    got, want = load_hf_tensors(tmp_path / "back"), load_hf_tensors(tmp_path / "hf")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_fiddle_loads_the_io_json_pyconv_writes(pyconv_nemo, nemo_stand_ins):
    import torch
    import torch.nn.functional as F

    fdl, serialization = nemo_stand_ins
    config = serialization.load_json((pyconv_nemo / "mixtral" / "context" / "io.json").read_text())
    assert fdl.get_callable(config).__qualname__ == "TrainerContext"
    assert fdl.get_callable(config.trainer).__qualname__ == "Trainer"  # NeMo's load_context(path) builds it
    assert (config.trainer.accelerator, fdl.get_callable(config.trainer.strategy).__qualname__) == (
        "cpu", "MegatronStrategy")
    model = config.model
    assert (fdl.get_callable(model).__module__, fdl.get_callable(model).__qualname__) == (
        "nemo.collections.llm.gpt.model.mixtral", "MixtralModel")
    c = model.config
    assert fdl.get_callable(c).__qualname__ == "MixtralConfig"
    sizes = (c.num_layers, c.hidden_size, c.ffn_hidden_size, c.num_attention_heads, c.num_query_groups)
    assert sizes == (2, 64, 96, 4, 2)
    assert (c.num_moe_experts, c.moe_router_topk, c.moe_ffn_hidden_size, c.vocab_size) == (4, 2, 96, 96)
    assert c.activation_func is F.silu and c.params_dtype is torch.float32 and c.gated_linear_unit
    assert (c.normalization, c.position_embedding_type, c.rotary_base) == ("RMSNorm", "rope", 5000.0)
    assert model.tokenizer.pretrained_model_name == "nemo_tokenizer"
    built = fdl.build(model)  # the stand-ins receive every argument
    assert built.kwargs["config"].kwargs["layernorm_epsilon"] == 1e-5


def _importer_style_context(fdl, serialization, hf_config: dict, family: str) -> str:
    """The io.json NeMo's HF importer writes for a Llama or GPT model (HFLlamaImporter.config sets
    these arguments; the rest stay class defaults), dumped by fiddle itself."""
    import torch

    module = sys.modules["nemo.collections.llm.gpt.model.llama" if family == "llama" else
                         "nemo.collections.llm.gpt.model.base"]
    if family == "llama":
        config = fdl.Config(module.LlamaConfig, num_layers=hf_config["num_hidden_layers"],
                            hidden_size=hf_config["hidden_size"], ffn_hidden_size=hf_config["intermediate_size"],
                            num_attention_heads=hf_config["num_attention_heads"], init_method_std=0.02,
                            layernorm_epsilon=hf_config["rms_norm_eps"],
                            num_query_groups=hf_config["num_key_value_heads"],
                            seq_length=hf_config["max_position_embeddings"],
                            rotary_base=hf_config.get("rope_theta", 10000.0), gated_linear_unit=True,
                            make_vocab_size_divisible_by=32, share_embeddings_and_output_weights=False,
                            fp16=False, bf16=False, params_dtype=torch.float32, vocab_size=hf_config["vocab_size"],
                            kv_channels=hf_config["head_dim"])
        model_cls = module.LlamaModel
    else:  # GPT-2 as a generic GPTConfig: LayerNorm, biases, learned positions (GPTConfig defaults)
        config = fdl.Config(module.GPTConfig, num_layers=hf_config["n_layer"], hidden_size=hf_config["n_embd"],
                            ffn_hidden_size=4 * hf_config["n_embd"], num_attention_heads=hf_config["n_head"],
                            seq_length=hf_config["n_positions"], add_qkv_bias=True,
                            layernorm_epsilon=hf_config["layer_norm_epsilon"],
                            vocab_size=hf_config["vocab_size"])
        model_cls = module.GPTModel
    tokenizer = fdl.Config(sys.modules["nemo.collections.common.tokenizers.huggingface.auto_tokenizer"].AutoTokenizer,
                           pretrained_model_name="nemo_tokenizer")
    context = fdl.Config(sys.modules["nemo.lightning.io.pl"].TrainerContext,
                         model=fdl.Config(model_cls, config=config, tokenizer=tokenizer), extra={})
    return serialization.dump_json(context, indent=2)


@needs_megatron
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_megatron_core_nemo2_checkpoint_converts_to_hf(models, nemo_stand_ins, tmp_path, family):
    """A NeMo 2 checkpoint as NeMo lays it out: Megatron-Core's dist_checkpointing.save of the
    model's sharded state dict under the `module.` prefix in weights/, fiddle's io.json in
    context/ (no HF config anywhere): pyconv -> HF gives the tensors bit for bit (the vocabulary
    the embedding holds) and transformers' logits."""
    import pyconv

    fdl, serialization = nemo_stand_ins
    model, src = models[family]
    with mh.megatron_parallel(1):
        megatron_save(src, tmp_path / "nemo" / "weights", 1, prefix="module.")
    (tmp_path / "nemo" / "context").mkdir()
    hf_config = json.loads((Path(src) / "config.json").read_text())
    (tmp_path / "nemo" / "context" / "io.json").write_text(
        _importer_style_context(fdl, serialization, hf_config, family))
    ckpt = pyconv.open(tmp_path / "nemo")
    assert (ckpt.format, ckpt.summary()["config_from"], ckpt.summary()["family"]) == ("nemo", "context/io.json", family)
    padded = ckpt.summary()["padded_vocab_size"]
    assert padded == 128  # Megatron-Core padded the vocabulary; io.json's vocab_size says 96 are real
    pyconv.reshard(tmp_path / "nemo", tmp_path / "hf", to="hf")
    assert_hf_output(model, src, tmp_path / "hf")


@needs_megatron
@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_megatron_core_loads_pyconv_nemo_weights(models, pyconv_nemo, family):
    """Megatron-Core loads weights/ into a GPTModel whose sharded state dict carries NeMo's
    `module.` prefix, with transformers' logits."""
    import torch
    from megatron.core import dist_checkpointing

    model, src = models[family]
    ids = example_input(model)
    with mh.megatron_parallel(1):
        gpt = _unpadded_model(mh._config_dict(src))
        with torch.no_grad():
            for p in gpt.parameters():
                p.fill_(float("nan"))
        loaded = dist_checkpointing.load({"model": gpt.sharded_state_dict(prefix="module.")},
                                         str(pyconv_nemo / family / "weights"))
        gpt.load_state_dict({k.removeprefix("module."): v for k, v in loaded["model"].items()}, strict=True)
        got = mh.forward_logits(gpt, ids, 96)
    assert (got - hf_logits(model, ids)).abs().max().item() < ATOL


def _unpadded_model(cfg):
    """The harness's GPTModel with the vocabulary unpadded (NeMo's importers pick a divisor of the vocab)."""
    from unittest import mock

    with mock.patch.object(mh, "padded_vocab_size", lambda vocab, tp, divisible_by=128: vocab):
        return mh.gpt_model_from_hf_config(cfg, 1)


# ---- bad input ------------------------------------------------------------------------------------

def test_unknown_config_class_is_named(pyconv_nemo, tmp_path):
    import pyconv
    from pyconv.errors import FormatError

    bare = without_hf_config(pyconv_nemo / "llama", tmp_path)
    io_json = bare / "context" / "io.json"
    io_json.write_text(io_json.read_text().replace('"name": "LlamaConfig"', '"name": "HyenaConfig"'))
    with pytest.raises(FormatError, match=r"io\.json: NeMo config class nemo\.collections\.llm\.gpt\.model\.llama\."
                                          r"HyenaConfig is not one pyconv knows"):
        pyconv.open(bare)


def test_missing_context_config_is_refused(pyconv_nemo, tmp_path):
    import pyconv
    from pyconv.errors import FormatError

    bare = without_hf_config(pyconv_nemo / "llama", tmp_path)
    (bare / "context" / "io.json").unlink()
    (bare / "context" / "model.yaml").unlink()
    with pytest.raises(FormatError, match=r"context: neither io\.json nor model\.yaml: the model config is unknown"):
        pyconv.open(bare)


def test_preset_config_without_sizes_is_refused(pyconv_nemo, tmp_path):
    """A preset class (Llama3Config8B) that leaves the sizes to its class defaults: pyconv does
    not tabulate them, and says so instead of guessing."""
    import pyconv
    from pyconv.errors import FormatError

    bare = without_hf_config(pyconv_nemo / "llama", tmp_path)
    io_json = bare / "context" / "io.json"
    data = json.loads(io_json.read_text())
    for obj in data["objects"].values():
        if obj and "<root>.model.config" in obj.get("paths", ()):
            obj["items"] = [i for i in obj["items"] if i[0] not in ("Attr(name='num_layers')",
                                                                    "Attr(name='hidden_size')")]
    io_json.write_text(json.dumps(data))
    with pytest.raises(FormatError, match=r"LlamaConfig does not set num_layers, hidden_size"):
        pyconv.open(bare)


# ---- NeMo 1 (an extracted .nemo archive) ---------------------------------------------------------------

# Megatron-Core local names -> the pre-Megatron-Core names of NeMo 1 GPT models (the inverse of
# BioNeMo's nemo1 -> nemo2 mapping, with GPT's decoder stack called "encoder" there).
LEGACY_NAMES = (("self_attention.linear_qkv.", "self_attention.query_key_value."),
                ("self_attention.linear_proj.", "self_attention.dense."), ("mlp.linear_fc1.", "mlp.dense_h_to_4h."),
                ("mlp.linear_fc2.", "mlp.dense_4h_to_h."), ("pre_mlp_layernorm.", "post_attention_layernorm."))


def legacy_nemo1_key(name: str) -> str:
    for new, old in LEGACY_NAMES:
        name = name.replace(new, old)
    if name.startswith("decoder."):
        name = "encoder." + name[len("decoder."):]
    return "model.language_model." + name


def nemo1_model_config(hf_config: dict, tp: int, legacy: bool) -> dict:
    """model_config.yaml as NeMo 1's megatron_gpt_config.yaml names the fields."""
    if hf_config["model_type"] == "gpt2":
        return dict(mcore_gpt=not legacy, num_layers=hf_config["n_layer"], hidden_size=hf_config["n_embd"],
                    ffn_hidden_size=4 * hf_config["n_embd"], num_attention_heads=hf_config["n_head"],
                    encoder_seq_length=hf_config["n_positions"], max_position_embeddings=hf_config["n_positions"],
                    normalization="layernorm", layernorm_epsilon=hf_config["layer_norm_epsilon"], bias=True,
                    activation="gelu", position_embedding_type="learned_absolute",
                    share_embeddings_and_output_weights=True, tensor_model_parallel_size=tp,
                    pipeline_model_parallel_size=1, make_vocab_size_divisible_by=128,
                    tokenizer={"library": "huggingface", "type": "gpt2"})
    return dict(mcore_gpt=not legacy, num_layers=hf_config["num_hidden_layers"], hidden_size=hf_config["hidden_size"],
                ffn_hidden_size=hf_config["intermediate_size"], num_attention_heads=hf_config["num_attention_heads"],
                num_query_groups=hf_config["num_key_value_heads"], kv_channels=hf_config.get("head_dim"),
                encoder_seq_length=hf_config["max_position_embeddings"],
                max_position_embeddings=hf_config["max_position_embeddings"], normalization="rmsnorm",
                layernorm_epsilon=hf_config["rms_norm_eps"], bias=False, activation="fast-swiglu",
                position_embedding_type="rope", rotary_base=hf_config.get("rope_theta", 10000.0),
                share_embeddings_and_output_weights=hf_config.get("tie_word_embeddings", False),
                tensor_model_parallel_size=tp, pipeline_model_parallel_size=1, make_vocab_size_divisible_by=128,
                precision="32", tokenizer={"library": "sentencepiece", "model": "nemo:tokenizer.model"})


def write_nemo1(src, out: Path, tp: int, legacy: bool, with_hf_config: bool) -> Path:
    """An extracted NeMo 1 checkpoint built from the HF weights by the harness's reference
    mapping (independent of pyconv): model_config.yaml and model_weights.ckpt, or
    mp_rank_TT/model_weights.ckpt for tp > 1, keys under `model.` (legacy: language_model names)."""
    import torch
    import yaml

    cfg = mh._config_dict(src)
    full = mh.megatron_full_tensors(mh._read_hf_weights(src), cfg)
    out.mkdir(parents=True)
    (out / "model_config.yaml").write_text(yaml.safe_dump(nemo1_model_config(cfg, tp, legacy)))
    if with_hf_config:
        shutil.copy(Path(src) / "config.json", out / "config.json")
    for rank in range(tp):
        shard = mh.megatron_shard(full, cfg, tp, rank)
        state = {(legacy_nemo1_key(k) if legacy else "model." + k): v for k, v in shard.items()}
        file = out / (f"mp_rank_{rank:02d}" if tp > 1 else "") / "model_weights.ckpt"
        file.parent.mkdir(exist_ok=True)
        torch.save(state, file)
    return out


@pytest.mark.parametrize("family, tp, legacy", [("llama", 2, True), ("gpt2", 1, False), ("qwen2", 2, False)])
def test_nemo1_checkpoint_with_hf_config_converts_to_hf(models, tmp_path, family, tp, legacy):
    import pyconv

    model, src = models[family]
    ckpt = write_nemo1(src, tmp_path / "nemo1", tp, legacy, with_hf_config=True)
    info = pyconv.open(ckpt).summary()
    assert (info["format"], info["family"], info["key_style"], info["tp"]) == ("nemo", family, "nemo1", tp)
    pyconv.reshard(ckpt, tmp_path / "hf", to="hf")
    assert_hf_output(model, src, tmp_path / "hf")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_nemo1_model_config_yaml_describes_the_model(models, tmp_path, family):
    """Without an HF config: the dims from model_config.yaml; the vocabulary is the embedding's
    padded rows (NeMo 1 keeps the true size in its tokenizer), the first rows the source's."""
    import torch

    import pyconv

    model, src = models[family]
    ckpt = write_nemo1(src, tmp_path / "nemo1", 2, family == "llama", with_hf_config=False)
    catalog = pyconv.open(ckpt)
    assert catalog.summary()["config_from"] == "model_config.yaml"
    original = json.loads((Path(src) / "config.json").read_text())
    keys = (["num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
             "head_dim", "rms_norm_eps", "tie_word_embeddings"] if family == "llama"
            else ["n_layer", "n_embd", "n_head", "n_positions", "layer_norm_epsilon", "tie_word_embeddings"])
    assert {k: catalog.config.get(k) for k in keys} == {k: original.get(k) for k in keys}
    assert catalog.config["vocab_size"] == 256  # padded to a multiple of 128 * tp
    pyconv.reshard(ckpt, tmp_path / "hf", to="hf")
    source, output = load_hf_tensors(src), load_hf_tensors(tmp_path / "hf")
    assert source.keys() == output.keys()
    for name in source:
        got = output[name][:96] if output[name].shape[0] == 256 else output[name]
        assert torch.equal(source[name], got), name


@needs_megatron
def test_nemo1_distributed_weights_convert_to_hf(models, tmp_path):
    """NeMo 1 Megatron-Core models save distributed weights (model_weights/) under `model.`."""
    import pyconv

    model, src = models["llama"]
    ckpt = tmp_path / "nemo1"
    with mh.megatron_parallel(1):
        megatron_save(src, ckpt / "model_weights", 1, prefix="model.")
    import yaml

    cfg = mh._config_dict(src)
    (ckpt / "model_config.yaml").write_text(yaml.safe_dump({**nemo1_model_config(cfg, 1, False)}))
    shutil.copy(Path(src) / "config.json", ckpt / "config.json")
    assert pyconv.open(ckpt).summary()["key_style"] == "nemo1"
    pyconv.reshard(ckpt, tmp_path / "hf", to="hf")
    assert_hf_output(model, src, tmp_path / "hf")


def test_nemo1_unknown_activation_is_named(models, tmp_path):
    import yaml

    import pyconv
    from pyconv.errors import FormatError

    ckpt = write_nemo1(models["llama"][1], tmp_path / "nemo1", 1, True, with_hf_config=False)
    cfg = yaml.safe_load((ckpt / "model_config.yaml").read_text())
    (ckpt / "model_config.yaml").write_text(yaml.safe_dump({**cfg, "activation": "squared-relu"}))
    with pytest.raises(FormatError, match=r"model_config\.yaml: activation 'squared-relu' has no pyconv family"):
        pyconv.open(ckpt)


def test_nemo1_missing_rank_is_named(models, tmp_path):
    import pyconv
    from pyconv.errors import FormatError

    ckpt = write_nemo1(models["llama"][1], tmp_path / "nemo1", 2, True, with_hf_config=True)
    shutil.rmtree(ckpt / "mp_rank_00")
    (ckpt / "mp_rank_02").mkdir()
    (ckpt / "mp_rank_02" / "model_weights.ckpt").write_bytes((ckpt / "mp_rank_01" / "model_weights.ckpt").read_bytes())
    with pytest.raises(FormatError, match=r"weights of tensor-parallel rank 0, pipeline rank 0 are missing"):
        pyconv.open(ckpt)


def test_nemo1_detection_shares_with_megatron_legacy(models, tmp_path):
    """GPT-2 in the pre-Megatron-Core names is megatron-legacy's to read; Megatron-Core names and
    Llama-style models in the old names are this adapter's."""
    import pyconv

    gpt2_legacy = write_nemo1(models["gpt2"][1], tmp_path / "a", 1, True, with_hf_config=False)
    gpt2_mcore = write_nemo1(models["gpt2"][1], tmp_path / "b", 1, False, with_hf_config=False)
    llama_legacy = write_nemo1(models["llama"][1], tmp_path / "c", 1, True, with_hf_config=False)
    assert [pyconv.open(p).format for p in (gpt2_legacy, gpt2_mcore, llama_legacy)] == [
        "megatron-legacy", "nemo", "nemo"]


def test_nemo1_bert_megatron_core_names_keep_the_encoder_stack(tmp_path):
    """Megatron-Core's BertModel calls its layer stack `encoder` (GPTModel: `decoder`): NeMo 1
    mcore_bert weights (`model.encoder.layers...`) read with the bert family's names. The rank file
    comes from pyconv's Megatron writer (BertModel names), its keys put under `model.`."""
    import torch
    import transformers

    import pyconv
    from pyconv.formats.nemo import nemo_to_mcore_key

    assert nemo_to_mcore_key("model.encoder.layers.1.self_attention.linear_qkv.weight", "encoder") == \
        "encoder.layers.1.self_attention.linear_qkv.weight"
    assert nemo_to_mcore_key("model.language_model.lm_head.layernorm.weight", "encoder") == "lm_head.layer_norm.weight"
    torch.manual_seed(5)
    config = transformers.MegatronBertConfig(vocab_size=96, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=96, max_position_embeddings=32, type_vocab_size=2)
    model = transformers.MegatronBertForPreTraining(config).eval()
    model.save_pretrained(tmp_path / "hf")
    pyconv.reshard(tmp_path / "hf", tmp_path / "meg", to="megatron")
    state = torch.load(tmp_path / "meg" / "release" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)["model"]
    assert any(k.startswith("encoder.layers.") for k in state)
    ckpt = tmp_path / "nemo1"
    ckpt.mkdir()
    torch.save({"model." + k: v for k, v in state.items()}, ckpt / "model_weights.ckpt")
    (ckpt / "model_config.yaml").write_text("mcore_bert: true\nnum_layers: 2\n")
    shutil.copy(tmp_path / "hf" / "config.json", ckpt / "config.json")
    catalog = pyconv.open(ckpt)
    assert (catalog.format, catalog.summary()["family"]) == ("nemo", "bert")
    pyconv.reshard(ckpt, tmp_path / "out", to="hf")
    source, output = load_hf_tensors(tmp_path / "hf"), load_hf_tensors(tmp_path / "out")
    assert source.keys() == output.keys() and all(torch.equal(source[k], output[k]) for k in source)


def test_reading_and_writing_never_import_torch(models, pyconv_nemo, tmp_path):
    import os
    import subprocess

    import pyconv

    bare = without_hf_config(pyconv_nemo / "mixtral", tmp_path)
    code = ("import sys, pyconv; c = pyconv.open(sys.argv[1]); pyconv.reshard(sys.argv[1], sys.argv[2], to='hf'); "
            "pyconv.reshard(sys.argv[3], sys.argv[4], to='nemo'); "
            "assert 'torch' not in sys.modules, 'torch was imported'; print(c.format, c.summary()['config_from'])")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(pyconv.__file__)))
    out = subprocess.run([sys.executable, "-c", code, str(bare), str(tmp_path / "hf"), models["llama"][1],
                          str(tmp_path / "nemo")], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["nemo", "context/io.json"]


@pytest.mark.parametrize("text, message", [
    ("{not json", r"io\.json: .*(JSON|json)"),
    ('{"root": {}}', r"io\.json: not a fiddle serialization \(no 'objects'\)"),
    ('{"objects": {}}', r"io\.json: no object at <root>\.model\.config"),
])
def test_malformed_io_json_is_named(pyconv_nemo, tmp_path, text, message):
    import pyconv
    from pyconv.errors import FormatError

    bare = without_hf_config(pyconv_nemo / "llama", tmp_path)
    (bare / "context" / "io.json").write_text(text)
    with pytest.raises(FormatError, match=message):
        pyconv.open(bare)


def test_config_field_of_the_wrong_type_is_named(pyconv_nemo, tmp_path):
    import pyconv
    from pyconv.errors import FormatError

    bare = without_hf_config(pyconv_nemo / "llama", tmp_path)
    io_json = bare / "context" / "io.json"
    data = json.loads(io_json.read_text())
    for obj in data["objects"].values():
        if obj and "<root>.model.config" in obj.get("paths", ()):
            for item in obj["items"]:
                if item[0] == "Attr(name='layernorm_epsilon')":
                    item[1]["value"] = "tiny"
    io_json.write_text(json.dumps(data))
    with pytest.raises(FormatError, match=r"io\.json: LlamaConfig\.layernorm_epsilon is 'tiny', not a int or float"):
        pyconv.open(bare)


def test_activation_names_in_the_context(pyconv_nemo):
    """SwiGLU models name SiLU; GPT-2's tanh GELU is Megatron-Core's openai_gelu."""
    assert "_target_: torch.nn.functional.silu" in (pyconv_nemo / "llama" / "context" / "model.yaml").read_text()
    gpt2 = (pyconv_nemo / "gpt2" / "context" / "model.yaml").read_text()
    assert "_target_: megatron.core.transformer.utils.openai_gelu" in gpt2 and "gated_linear_unit: false" in gpt2
