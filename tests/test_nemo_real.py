"""pyconv's NeMo 2 output judged by NeMo itself (nemo_toolkit 2.x: `nemo.lightning.io`).

CI does not install NeMo (too heavy); these tests skip without it. They ran with nemo_toolkit 2.5.0,
megatron-core 0.14.0 (NeMo 2.5's pairing; 0.16.1 lacks `ModelCommProcessGroups`, which NeMo 2.5
imports), lightning 2.4.0, transformers 4.53.3, torch 2.13.0 CPU, numpy 1.26.4, in a venv of their own:

    python3 -m venv /tmp/nemo-venv && . /tmp/nemo-venv/bin/activate
    pip install torch==2.13.0 && pip install --no-deps nemo_toolkit==2.5.0
    pip install lightning==2.4.0 fiddle hydra-core==1.3.2 omegaconf==2.3.0 cloudpickle transformers~=4.53.0 \
        "huggingface-hub<1.0" "datasets<4" safetensors psutil pytest wrapt ruamel.yaml fsspec==2024.12.0 \
        python-dateutil text-unidecode tqdm torchmetrics einops sentencepiece tiktoken wget "protobuf~=5.29.5" \
        tensorboard onnx scikit-learn numba rich braceexpand webdataset h5py matplotlib tensorstore zarr \
        nemo_run==0.5.0 leptonai==0.26.9 "packaging<25"
    pip install megatron-core==0.14.0 "numpy<2" "pandas<2.3" "ml-dtypes<0.6" "zarr<3" "pyarrow<21"
    # pyconv: copy .venv's _editable_skbc_pyconv.{pth,py} into its site-packages and link
    # pyconv/_core*.so there; then: python -m pytest tests/test_nemo_real.py

On a CPU without TransformerEngine/Apex, NeMo's Llama config defaults fused kernels on
(apply_rope_fusion, persist_layer_norm, ...) that Megatron-Core refuses to build: the tests turn
those runtime knobs off; they are no part of the checkpoint. `modelopt` (NVIDIA's optimizer
toolkit, not on pip here) is stubbed with no-op save/restore of its (absent) state.

- load_context(context, subpath="model") builds NeMo's LlamaModel with the config the HF config
  implies and NeMo's AutoTokenizer from context/nemo_tokenizer; load_context(context) builds the
  whole TrainerContext (trainer included).
- NeMo's MegatronCheckpointIO (dist_checkpointing, strict) loads weights/ into the model NeMo
  configured, under MegatronParallel's `module.` prefix; its logits equal transformers' (Llama,
  Qwen2, GPT-2).
- NeMo's own HF importer (io.import_ckpt) writes a checkpoint that pyconv reads back to HF with the
  same tensors, and rewrites as NeMo with the same DCP tensors bit for bit.
"""

from __future__ import annotations

import contextlib
import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import pytest

if importlib.util.find_spec("nemo") is None:
    pytest.skip("NeMo (nemo_toolkit 2.x with nemo.lightning.io) is not installed", allow_module_level=True)
try:
    import nemo.lightning.io  # noqa: F401
except ImportError as e:
    pytest.skip(f"NeMo 2 is not importable: {e}", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).parent))
import megatron_harness as mh  # noqa: E402
from conftest import build_tiny_model, example_input, load_hf_tensors, nontrivial_vectors  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]
ATOL = 1e-5
FUSION_KNOBS = ("apply_rope_fusion", "persist_layer_norm", "bias_activation_fusion", "bias_dropout_fusion",
                "masked_softmax_fusion", "gradient_accumulation_fusion", "cross_entropy_loss_fusion",
                "moe_permute_fusion", "moe_grouped_gemm")  # the last two: Qwen3MoEConfig's TE-only defaults


def cpu_nemo():
    """Process-wide: fused-kernel knobs off in every TransformerConfig, modelopt stubbed, and
    NeMo's post-load device fix-up (which asserts CUDA) a no-op: on a CPU nothing is on a GPU."""
    import megatron.core.transformer.transformer_config as tc
    import nemo.lightning.io.pl as nemo_pl

    if not getattr(tc.TransformerConfig.__post_init__, "_cpu_nemo", False):
        original = tc.TransformerConfig.__post_init__

        def post_init(self):
            for knob in FUSION_KNOBS:
                if hasattr(self, knob):
                    object.__setattr__(self, knob, False)
            original(self)

        post_init._cpu_nemo = True
        tc.TransformerConfig.__post_init__ = post_init
    if importlib.util.find_spec("modelopt") is None:
        utils = types.ModuleType("nemo.collections.llm.modelopt.model_utils")
        utils.restore_modelopt_state = utils.save_modelopt_state = lambda *a, **k: None
        package = types.ModuleType("nemo.collections.llm.modelopt")
        package.model_utils = utils
        sys.modules.update({package.__name__: package, utils.__name__: utils})
    nemo_pl._fix_tensors_device = lambda ckpt: ckpt


def real_tokenizer(path: Path, vocab_size: int) -> None:
    """A real (word-level) HF fast tokenizer: NeMo's AutoTokenizer loads it, unlike conftest's stand-ins."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(path)


def pyconv_cli(*args):
    r = subprocess.run([sys.executable, "-m", "pyconv", *map(str, args)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """family -> (model, HF dir, pyconv's NeMo 2 dir) for the conftest tiny models (Llama: GQA,
    head_dim 24; Qwen2: qkv biases, tied embeddings; GPT-2: LayerNorm, learned positions)."""
    root, done = tmp_path_factory.mktemp("nemo_real"), {}

    def get(family):
        if family not in done:
            model = (build_tiny_model(family) if family in ("llama", "qwen2", "gpt2") else
                     qwen3_model(family) if family.startswith("qwen3") else dense_2025_model(family))
            model.save_pretrained(root / family / "hf")
            real_tokenizer(root / family / "hf", model.config.vocab_size)
            # A MoE layer's pre-MLP norm is keyed by layer spec: NeMo here (no TransformerEngine)
            # builds the local one; with TransformerEngine, pyconv's default (te) is the match.
            naming = ["--megatron-naming", "local"] if family == "qwen3_moe" else []
            pyconv_cli("reshard", root / family / "hf", root / family / "nemo", "--to", "nemo", *naming)
            done[family] = (model, root / family / "hf", root / family / "nemo")
        return done[family]
    return get


def qwen3_model(family: str):
    """Tiny Qwen3 / Qwen3-MoE (GQA, head_dim 24, 8 experts top-2) with non-trivial q/k norms."""
    import torch
    import transformers

    torch.manual_seed(5)
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=24, max_position_embeddings=64, rope_theta=1e6)
    config = (transformers.Qwen3Config(**common, tie_word_embeddings=True) if family == "qwen3" else
              transformers.Qwen3MoeConfig(**common, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                                          norm_topk_prob=True, tie_word_embeddings=False))
    return nontrivial_vectors(transformers.AutoModelForCausalLM.from_config(config).eval())


def dense_2025_model(family: str):
    """Tiny Phi-3 (GQA, partial rotary 0.75), Gemma 2 (soft caps, window 8, query_pre_attn_scalar
    24, head_dim 16) and Gemma 3 (q/k norms, two rope bases, window 8, a full layer every 3)."""
    import torch
    import transformers

    torch.manual_seed(6)
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64)
    if family == "phi3":
        config = transformers.Phi3Config(**common, num_hidden_layers=3, partial_rotary_factor=0.75, pad_token_id=0,
                                         bos_token_id=1, eos_token_id=2)
    elif family == "gemma2":
        config = transformers.Gemma2Config(**common, num_hidden_layers=4, head_dim=16, sliding_window=8,
                                           query_pre_attn_scalar=24, attn_logit_softcapping=4.0,
                                           final_logit_softcapping=2.0)
    else:
        config = transformers.Gemma3TextConfig(**common, num_hidden_layers=6, head_dim=16, sliding_window=8,
                                               query_pre_attn_scalar=24, sliding_window_pattern=3,
                                               rope_local_base_freq=100.0, rope_theta=10000.0,
                                               rope_scaling={"rope_type": "linear", "factor": 4.0})
    return nontrivial_vectors(transformers.AutoModelForCausalLM.from_config(config).eval())


# Runtime knobs of NeMo's Qwen3MoEConfig that need TransformerEngine or a GPU (grouped GEMM,
# all-to-all dispatch, fused permutation): off for a CPU run; no part of the checkpoint.
MOE_CPU_KNOBS = dict(moe_grouped_gemm=False, moe_token_dispatcher_type="allgather", moe_permute_fusion=False,
                     moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0)


@pytest.fixture(scope="module")
def llama(converted):
    return converted("llama")


def nemo_model(context: Path):
    import fiddle as fdl
    from nemo.lightning.io import load_context

    cpu_nemo()
    return fdl.build(load_context(context, subpath="model", build=False))


def test_nemo_load_context_builds_the_model_and_tokenizer(llama):
    import torch
    import torch.nn.functional as F
    from nemo.collections.llm.gpt.model.llama import LlamaConfig, LlamaModel
    from nemo.lightning.io import load_context

    model, _, out = llama
    hf = model.config
    m = nemo_model(out / "context")
    assert type(m) is LlamaModel and type(m.config) is LlamaConfig
    c = m.config
    assert (c.num_layers, c.hidden_size, c.ffn_hidden_size, c.num_attention_heads, c.num_query_groups,
            c.kv_channels) == (hf.num_hidden_layers, hf.hidden_size, hf.intermediate_size, hf.num_attention_heads,
                               hf.num_key_value_heads, hf.head_dim)
    assert (c.layernorm_epsilon, c.rotary_base, c.seq_length, c.vocab_size) == (
        hf.rms_norm_eps, hf.rope_theta, hf.max_position_embeddings, hf.vocab_size)
    assert (c.normalization, c.position_embedding_type, c.gated_linear_unit, c.activation_func) == (
        "RMSNorm", "rope", True, F.silu)
    assert not c.share_embeddings_and_output_weights and not c.add_bias_linear and not c.add_qkv_bias
    assert c.params_dtype is torch.float32 and not c.bf16 and not c.fp16
    assert m.tokenizer.vocab_size == hf.vocab_size
    assert m.tokenizer.text_to_ids("w5 w7 w90") == [5, 7, 90]
    ctx = load_context(out / "context")  # without a subpath: the whole TrainerContext, trainer built
    assert type(ctx).__name__ == "TrainerContext" and type(ctx.model) is LlamaModel
    assert type(ctx.trainer.strategy).__name__ == "MegatronStrategy"
    assert ctx.model.config.num_layers == hf.num_hidden_layers


@pytest.mark.parametrize("family, nemo_class", [("llama", "LlamaModel"), ("qwen2", "Qwen2Model"),
                                                ("gpt2", "GPTModel"), ("qwen3", "Qwen3Model"),
                                                ("qwen3_moe", "Qwen3Model"), ("phi3", "Phi3Model")])
def test_nemo_loads_pyconv_weights_with_transformers_logits(converted, family, nemo_class):
    import torch
    from nemo.lightning.io import load_context
    from nemo.lightning.io.pl import MegatronCheckpointIO

    model, _, out = converted(family)
    m = nemo_model(out / "context")
    assert type(m).__name__ == nemo_class
    assert type(load_context(out / "context").model).__name__ == nemo_class  # whole context builds too
    if family.startswith("qwen3"):
        c, hf = m.config, model.config
        assert type(c).__name__ == ("Qwen3MoEConfig" if family == "qwen3_moe" else "Qwen3Config")
        assert (c.qk_layernorm, c.kv_channels, c.num_query_groups, c.add_qkv_bias) == (True, 24, 2, False)
        if family == "qwen3_moe":
            assert (c.num_moe_experts, c.moe_router_topk, c.moe_ffn_hidden_size, c.moe_router_pre_softmax) == (
                hf.num_experts, hf.num_experts_per_tok, hf.moe_intermediate_size, False)
            for knob, value in MOE_CPU_KNOBS.items():
                setattr(c, knob, value)
    with mh.megatron_parallel(1):
        m.module = m.config.configure_model(m.tokenizer)  # what LlamaModel.configure_model does
        sharded = m.module.sharded_state_dict(prefix="module.")  # MegatronParallel's prefix
        ckpt = MegatronCheckpointIO(save_ckpt_format="torch_dist").load_checkpoint(
            out / "weights", sharded_state_dict={"state_dict": sharded}, strict=True)
        state = {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}
        assert sorted(state) == sorted(k.removeprefix("module.") for k in sharded)
        missing, unexpected = m.module.load_state_dict(state, strict=False)
        assert [k for k in missing if not k.endswith("_extra_state")] == [] and unexpected == []
        m.module.eval()
        ids = example_input(model)
        got = mh.forward_logits(m.module, ids, model.config.vocab_size)
    with torch.no_grad():
        ref = model(ids).logits.float()
    assert torch.allclose(got, ref, atol=ATOL, rtol=0), (got - ref).abs().max()


def test_nemo_runs_llama3_rope_scaling_with_transformers_logits(tmp_path):
    """Llama 3.x rope scaling: NeMo builds Llama31Config from pyconv's io.json, applies the scaling
    in configure_model, and gives transformers' logits on a 64-token input with sharp attention
    (where plain rope differs)."""
    import torch
    import transformers
    from nemo.lightning.io.pl import MegatronCheckpointIO

    torch.manual_seed(2)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      rope_theta=500000.0, rope_scaling={
                                          "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    model = nontrivial_vectors(transformers.LlamaForCausalLM(config).eval())
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(12.0)
            layer.self_attn.k_proj.weight.mul_(12.0)
    model.save_pretrained(tmp_path / "hf")
    real_tokenizer(tmp_path / "hf", 96)
    pyconv_cli("reshard", tmp_path / "hf", tmp_path / "nemo", "--to", "nemo")
    m = nemo_model(tmp_path / "nemo" / "context")
    assert type(m.config).__name__ == "Llama31Config" and m.config.scale_factor == 8.0
    ids = torch.randint(0, 96, (2, 64), generator=torch.Generator().manual_seed(1))
    with mh.megatron_parallel(1):
        m.module = m.config.configure_model(m.tokenizer)
        sharded = m.module.sharded_state_dict(prefix="module.")
        ckpt = MegatronCheckpointIO(save_ckpt_format="torch_dist").load_checkpoint(
            tmp_path / "nemo" / "weights", sharded_state_dict={"state_dict": sharded}, strict=True)
        m.module.load_state_dict({k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}, strict=False)
        got = mh.forward_logits(m.module.eval(), ids, 96)
    with torch.no_grad():
        ref = model(ids).logits.float()
    assert torch.allclose(got, ref, atol=ATOL, rtol=0), (got - ref).abs().max()


def test_nemo_builds_pyconv_phi3_config(converted):
    _, _, out = converted("phi3")
    c = nemo_model(out / "context").config
    assert type(c).__name__ == "Phi3Config"
    assert (c.num_query_groups, c.rotary_percent, c.kv_channels) == (2, 0.75, 16)


# The weights NeMo 2.5's Gemma importers (gemma2.py / gemma3.py convert_state) write, one layer;
# Gemma 3 adds the q/k norms. The shapes are the tiny models'.
NEMO_GEMMA_LAYER = {"self_attention.linear_qkv.layer_norm_weight": (64,), "self_attention.linear_qkv.weight": (128, 64),
                    "self_attention.linear_proj.weight": (64, 64),
                    "self_attention.linear_proj.post_layernorm.weight": (64,),
                    "mlp.linear_fc1.layer_norm_weight": (64,), "mlp.linear_fc1.weight": (192, 64),
                    "mlp.linear_fc2.weight": (64, 96), "mlp.linear_fc2.post_layernorm.weight": (64,)}


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_nemo_builds_pyconv_gemma_config_and_names_its_weights(converted, family):
    """NeMo's Gemma layers need TransformerEngine, so no forward here: the config NeMo builds from
    pyconv's io.json against NeMo's own HF importer (Gemma 2) or NeMo's Gemma3Config semantics,
    and the DCP keys and shapes against NeMo's importer mapping."""
    import math

    from nemo.collections.llm.fn.activation import openai_gelu

    model, hf, out = converted(family)
    m = nemo_model(out / "context")
    c = m.config
    assert type(m).__name__ == ("Gemma2Model" if family == "gemma2" else "Gemma3Model")
    assert c.layernorm_zero_centered_gamma and c.gated_linear_unit and c.activation_func is openai_gelu
    assert (c.kv_channels, c.num_query_groups, c.share_embeddings_and_output_weights) == (16, 2, True)
    if family == "gemma2":
        from nemo.collections.llm.gpt.model.gemma2 import HFGemmaImporter

        nemo_own = HFGemmaImporter(str(hf)).config  # NeMo's importer leaves kv_channels and seq_length at defaults
        for field in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                      "layernorm_epsilon", "rotary_base", "query_pre_attn_scalar", "attn_logit_softcapping",
                      "final_logit_softcapping", "window_size", "vocab_size", "share_embeddings_and_output_weights",
                      "layernorm_zero_centered_gamma", "activation_func", "gated_linear_unit"):
            assert getattr(c, field) == getattr(nemo_own, field), field
    else:
        assert (c.rotary_base, c.window_size, c.interleaved_attn_pattern, c.rope_scaling_factor) == (
            (100.0, 10000.0), 8, (2, 1), 4.0)
        assert c.qk_layernorm and math.isclose(c.softmax_scale, 24 ** -0.5, rel_tol=0, abs_tol=0)
    layer = {**NEMO_GEMMA_LAYER, **({"self_attention.q_layernorm.weight": (16,),
                                     "self_attention.k_layernorm.weight": (16,)} if family == "gemma3" else {})}
    layers = model.config.num_hidden_layers  # stacked on a leading layer axis, as Megatron-Core saves them
    want = {"module.embedding.word_embeddings.weight": (96, 64), "module.decoder.final_layernorm.weight": (64,),
            **{f"module.decoder.layers.{k}": (layers, *shape) for k, shape in layer.items()}}
    got = {k: tuple(v.shape) for k, v in read_dcp(out / "weights").items()}
    assert got == want


def nemo_import(hf_dir: str, out_dir: str) -> None:
    """NeMo's own HF -> NeMo 2 importer (run in a process of its own: its writer spawns processes)."""
    from nemo.collections import llm
    from nemo.lightning import io

    cpu_nemo()
    with mh.cpu_patches():
        # The model passed only picks the importer; it takes the config from config.json.
        io.import_ckpt(model=llm.LlamaModel(llm.LlamaConfig(num_layers=1, hidden_size=64, num_attention_heads=4)),
                       source=f"hf://{hf_dir}", output_path=Path(out_dir))


def read_dcp(path: Path) -> dict:
    import torch
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(str(path))
    md = reader.read_metadata().state_dict_metadata
    state = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in md.items() if hasattr(v, "size")}
    dcp.load(state, storage_reader=dcp.FileSystemReader(str(path)), no_dist=True)
    return state


def test_pyconv_reads_nemo_own_import_back(llama, tmp_path):
    import torch

    _, hf, _ = llama
    native = tmp_path / "nemo_native"
    r = subprocess.run([sys.executable, __file__, "import", str(hf), str(native)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (native / "weights" / ".metadata").is_file() and (native / "context" / "io.json").is_file()
    pyconv_cli("reshard", native, tmp_path / "back", "--to", "hf")
    pyconv_cli("reshard", native, tmp_path / "again", "--to", "nemo")
    stored, rewritten = read_dcp(native / "weights"), read_dcp(tmp_path / "again" / "weights")
    assert sorted(stored) == sorted(rewritten)
    for key, t in stored.items():
        assert t.dtype == rewritten[key].dtype and torch.equal(t, rewritten[key]), key
    src, back = load_hf_tensors(hf), load_hf_tensors(tmp_path / "back")
    assert sorted(src) == sorted(back)
    # NeMo 2.5's importer without TransformerEngine builds the local layer spec (input_layernorm)
    # but maps the HF norms onto TE names (linear_qkv.layer_norm_weight), so it saves the norms
    # as initialised (ones); every other tensor comes back bit for bit.
    norms = {k for k in src if k.endswith("layernorm.weight") and ".layers." in k}
    for key in src:
        if key in norms:
            assert torch.equal(back[key], torch.ones_like(back[key])), key
        else:
            assert src[key].dtype == back[key].dtype and torch.equal(src[key], back[key]), key


if __name__ == "__main__":
    if sys.argv[1:2] == ["import"]:
        with contextlib.redirect_stdout(sys.stderr):
            nemo_import(sys.argv[2], sys.argv[3])
