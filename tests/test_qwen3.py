"""Qwen3 and Qwen3-MoE: the Llama layout plus per-head q/k RMSNorms (Megatron-Core's
qk_layernorm: self_attention.q_layernorm / k_layernorm), Qwen3-MoE's experts without a shared one.

Judges: the safetensors library (bitwise round trips over tp/pp/ep/etp), transformers (loads the
result with no missing or unexpected keys, identical logits, the same config) and Megatron-Core
0.16 (CPU, gloo, local spec with qk_layernorm: loads pyconv's output strictly at tp 1, tp 2 and
ep 2 with transformers' logits; its own save converts to the exact HF tensors)."""

from __future__ import annotations


import pytest
import torch

import megatron_harness as mh
import pyconv
from conftest import config_json as _config_json
from conftest import example_input, nontrivial_vectors
from conftest import hf_logits as _logits
from conftest import load_hf_tensors as hf_tensors

needs_megatron = pytest.mark.skipif(not mh.megatron_available(), reason="megatron-core is not installed")
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning:megatron"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning:megatron")]
ATOL = 1e-5


def _config(family: str):
    import transformers

    common = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=24, max_position_embeddings=64, rope_theta=1e6)
    if family == "qwen3":  # tied, as the small Qwen3 models are
        return transformers.Qwen3Config(**common, tie_word_embeddings=True)
    return transformers.Qwen3MoeConfig(**common, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                                       norm_topk_prob=True, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import transformers

    root = tmp_path_factory.mktemp("qwen3")
    out = {}
    for seed, family in enumerate(("qwen3", "qwen3_moe")):
        torch.manual_seed(seed)
        # distinct norms: q_norm and k_norm swapped cannot go unnoticed
        model = nontrivial_vectors(transformers.AutoModelForCausalLM.from_config(_config(family)).eval())
        model.save_pretrained(root / family)
        out[family] = (model, root / family)
    return out


@pytest.mark.parametrize("family,tp,pp,ep,etp", [("qwen3", 2, 2, 1, None), ("qwen3", 1, 4, 1, None),
                                                 ("qwen3_moe", 2, 2, 2, None), ("qwen3_moe", 2, 1, 2, 1)])
def test_round_trip_and_transformers(models, tmp_path, family, tp, pp, ep, etp):
    import transformers

    model, src = models[family]
    pyconv.reshard(src, tmp_path / "meg", to="megatron", tp=tp, pp=pp, ep=ep, etp=etp)
    info = pyconv.open(tmp_path / "meg").summary()
    assert (info["family"], info["tp"], info["pp"], info["ep"]) == (family, tp, pp, ep)
    first = torch.load(sorted((tmp_path / "meg" / "release").glob("*/model_optim_rng.pt"))[0], weights_only=False)
    assert first["args"].qk_layernorm is True
    assert first["model"]["decoder.layers.0.self_attention.q_layernorm.weight"].shape == (24,)
    pyconv.reshard(tmp_path / "meg", tmp_path / "back", to="hf")
    a, b = hf_tensors(src), hf_tensors(tmp_path / "back")
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    assert _config_json(tmp_path / "back") == _config_json(src)
    loaded, loading = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"]
    ids = example_input(model)
    assert torch.equal(_logits(model, ids), _logits(loaded.eval(), ids))


def test_families_are_told_apart_by_the_args(models, tmp_path):
    """A Qwen3 checkpoint's args (qk_layernorm) do not read as Llama, and Llama's not as Qwen3."""
    from pyconv.families import family_for_megatron_args, get_family

    _, src = models["qwen3"]
    catalog = pyconv.open(src)
    args = get_family("qwen3").megatron_args_from_hf(catalog.config, get_family("qwen3").dims_from_hf(catalog.config))
    assert family_for_megatron_args(args, "args").name == "qwen3"
    assert family_for_megatron_args({**args, "qk_layernorm": False}, "args").name == "llama"


@needs_megatron
def test_megatron_core_runs_pyconv_output(models, tmp_path):
    runs = []
    for family, tp, ep in (("qwen3", 1, 1), ("qwen3_moe", 1, 1), ("qwen3", 2, 1), ("qwen3_moe", 1, 2)):
        model, src = models[family]
        out = tmp_path / f"{family}-tp{tp}-ep{ep}"
        pyconv.reshard(src, out, to="megatron", tp=tp, ep=ep, megatron_naming="local")
        runs.append((out, _config_json(src), tp, ep, example_input(model)))
    for (out, _, tp, ep, ids), got in zip(runs, mh.megatron_logits_many(runs, timeout=240)):
        model = models["qwen3_moe" if "moe" in out.name else "qwen3"][0]
        assert (got - _logits(model, ids)).abs().max().item() < ATOL, out.name


@needs_megatron
@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe"])
def test_checkpoint_saved_by_megatron_core_converts_to_hf(models, tmp_path, family):
    model, src = models[family]
    ckpt = mh.save_with_megatron(src, tmp_path / "mg", tp=1)
    assert pyconv.open(ckpt).summary()["family"] == family
    pyconv.reshard(ckpt, tmp_path / "hf", to="hf")
    a, b = hf_tensors(src), hf_tensors(tmp_path / "hf")
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []


@needs_megatron
@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe"])
def test_torch_dist_round_trip_and_megatron_core_load(models, tmp_path, family):
    from test_torch_dist import megatron_load_logits

    model, src = models[family]
    # local naming: the local spec keys the MoE pre-MLP norm apart from TransformerEngine's
    pyconv.reshard(src, tmp_path / "td", to="torch_dist", megatron_naming="local" if "moe" in family else "te")
    pyconv.reshard(tmp_path / "td", tmp_path / "back", to="hf")
    a, b = hf_tensors(src), hf_tensors(tmp_path / "back")
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    ids = example_input(model)
    with mh.megatron_parallel(1):
        got = megatron_load_logits(tmp_path / "td" / "release", src, 1, ids)
    assert (got - _logits(model, ids)).abs().max().item() < ATOL


@pytest.mark.parametrize("family,config_class", [("qwen3", "Qwen3Config"), ("qwen3_moe", "Qwen3MoEConfig")])
def test_nemo2_round_trip(models, tmp_path, family, config_class):
    """NeMo 2 output names NeMo's Qwen3 classes with qk_layernorm; read back from the HF config.json
    pyconv puts beside it and from io.json alone (test_nemo_real.py: NeMo itself loads it)."""
    import shutil

    from pyconv.formats.nemo import read_io_json

    _, src = models[family]
    pyconv.reshard(src, tmp_path / "nemo", to="nemo")
    cls, fields = read_io_json(str(tmp_path / "nemo" / "context" / "io.json"))
    assert cls == f"nemo.collections.llm.gpt.model.qwen3.{config_class}" and fields["qk_layernorm"] is True
    pyconv.reshard(tmp_path / "nemo", tmp_path / "back", to="hf")
    assert pyconv.verify(src, tmp_path / "back").equal
    shutil.rmtree(tmp_path / "nemo" / "context" / "nemo_tokenizer")
    assert pyconv.open(tmp_path / "nemo").summary()["family"] == family
    pyconv.reshard(tmp_path / "nemo", tmp_path / "back2", to="hf")
    assert pyconv.verify(src, tmp_path / "back2").equal
