"""Mixture-of-experts models (Mixtral, Qwen2-MoE) in Megatron-Core distributed checkpoints.

Megatron-Core itself is the judge both ways (CPU, gloo, local spec with sequential experts,
`allgather` dispatcher): checkpoints it saves with `dist_checkpointing.save` (TP=1 in this
process; TP=1 x EP=2 and TP=2 x EP=1 under one torchrun start) convert to the HF tensors bit for
bit and to a model with transformers' logits; pyconv's torch_dist output loads through
`dist_checkpointing.load` into GPTModels at (TP, EP) = (1, 1), (2, 1) and (1, 2) with
transformers' logits, and through PyTorch's own DCP reader with the tensors Megatron-Core saved.
DeepSeek-V3 (dense first layer, multi-latent attention): Megatron-Core saves per-layer keys; its
save converts to HF bit for bit and it loads pyconv's output with transformers' logits.
"""

from __future__ import annotations

import pytest

import megatron_harness as mh
from conftest import example_input, load_hf_tensors
from test_torch_dist import assert_transformers_agrees, hf_logits, megatron_load_logits, megatron_save, run_torchrun_jobs

ATOL = 1e-5
FAMILIES = ("mixtral", "qwen2_moe")
EXPERTS, LAYERS = 4, 2
MOE_FFN = {"mixtral": 96, "qwen2_moe": 32}
needs_megatron = pytest.mark.skipif(not mh.megatron_available(), reason="megatron-core is not installed")
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]


def _config(family):
    import transformers

    common = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=64)
    if family == "mixtral":
        return transformers.MixtralConfig(num_local_experts=EXPERTS, rope_theta=5000.0, **common)
    return transformers.Qwen2MoeConfig(num_experts=EXPERTS, moe_intermediate_size=32,
                                       shared_expert_intermediate_size=48, **common)


def moe_model(family: str, seed: int):
    """A tiny random model of the family with non-trivial norms and biases."""
    import torch
    import transformers

    from conftest import nontrivial_vectors

    torch.manual_seed(seed)
    return nontrivial_vectors(transformers.AutoModelForCausalLM.from_config(_config(family)).eval())


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    """{family: (model, HF dir)}: tiny random models with non-trivial norms and biases."""
    root = tmp_path_factory.mktemp("torch_dist_moe_models")
    out = {}
    for seed, family in enumerate(FAMILIES):
        model = moe_model(family, seed)
        model.save_pretrained(root / family, max_shard_size="60KB")
        out[family] = (model, str(root / family))
    return out


@pytest.fixture(scope="module")
def pyconv_moe(moe_models, tmp_path_factory):
    """pyconv's torch_dist output of each model, for Megatron-Core's local spec and for
    TransformerEngine's (they differ only in the pre-MLP norm's key)."""
    import pyconv

    root = tmp_path_factory.mktemp("pyconv_torch_dist_moe")
    for family, (_, src) in moe_models.items():
        for naming in ("local", "te"):
            pyconv.reshard(src, root / f"{family}_{naming}", to="torch_dist", megatron_naming=naming)
    return root


@pytest.fixture(scope="module")
def saved_tp1(moe_models, tmp_path_factory):
    """Megatron-Core's own TP=1 saves, in this process (a config.json beside each: a bare
    dist_checkpointing.save holds no args)."""
    import shutil

    if not mh.megatron_available():
        pytest.skip("megatron-core is not installed")
    root = tmp_path_factory.mktemp("torch_dist_moe_tp1")
    with mh.megatron_parallel(1):
        for family in FAMILIES:
            megatron_save(moe_models[family][1], root / family, 1)
    for family in FAMILIES:
        shutil.copy(f"{moe_models[family][1]}/config.json", root / family / "config.json")
    return {family: root / family for family in FAMILIES}


TORCHRUN = {"mixtral": (1, 2), "qwen2_moe": (2, 1)}  # (tp, ep) of Megatron-Core's save; the load uses the other


@pytest.fixture(scope="module")
def torchrun_moe(moe_models, pyconv_moe, tmp_path_factory):
    """One torchrun world of 2: Megatron-Core saves Mixtral at TP=1 x EP=2 and Qwen2-MoE at
    TP=2 x EP=1, and loads pyconv's output of each at both layouts (logits to files)."""
    import shutil

    import torch

    if not mh.megatron_available():
        pytest.skip("megatron-core is not installed")
    root = tmp_path_factory.mktemp("torch_dist_moe_tp2")
    jobs, logits = [], {}
    for family, (tp, ep) in TORCHRUN.items():
        jobs.append({"save": moe_models[family][1], "out": str(root / f"saved_{family}"), "tp": tp, "ep": ep})
    for family in FAMILIES:
        model, src = moe_models[family]
        torch.save(example_input(model), root / f"ids_{family}.pt")
        for tp, ep in ((1, 2), (2, 1)):
            logits[(family, tp, ep)] = root / f"logits_{family}_{tp}_{ep}.pt"
            jobs.append({"load": str(pyconv_moe / f"{family}_local" / "release"), "hf": src, "tp": tp, "ep": ep,
                         "input": str(root / f"ids_{family}.pt"), "logits": str(logits[(family, tp, ep)])})
    run_torchrun_jobs(jobs, nproc=2, timeout=300)
    for family in FAMILIES:
        shutil.copy(f"{moe_models[family][1]}/config.json", root / f"saved_{family}" / "config.json")
    return {"saved": {f: root / f"saved_{f}" for f in FAMILIES},
            "logits": {k: torch.load(p, weights_only=True) for k, p in logits.items()}}


def assert_hf_output(model, src, out_dir):
    """The HF output holds the source's tensors bit for bit (per-expert keys as transformers
    saves them), and transformers loads it into a model with the same logits."""
    import torch

    source, output = load_hf_tensors(src), load_hf_tensors(out_dir)
    assert source.keys() == output.keys()
    for name in source:
        assert torch.equal(source[name], output[name]), name
    assert_transformers_agrees(model, out_dir)


# ---- what Megatron-Core writes -------------------------------------------------------------------

@needs_megatron
def test_megatron_core_moe_layout_facts(saved_tp1, torchrun_moe):
    """What the reader relies on, as Megatron-Core 0.16 writes it: the routed experts under one key
    with the expert axis after the layer axis, each expert's fc1 as [gate; up] (saved in two
    halves; at TP=2 four quarters), expert extra state per (layer, expert), and the local spec's
    pre-MLP norm under the fused TransformerEngine name."""
    from pyconv.io.dcp import read_metadata

    md = read_metadata(str(saved_tp1["mixtral"]))
    fc1 = "decoder.layers.mlp.experts.experts.linear_fc1.weight"
    fc2 = "decoder.layers.mlp.experts.experts.linear_fc2.weight"
    assert md.tensors[fc1].size == (LAYERS, EXPERTS, 2 * 96, 64)
    assert md.tensors[fc2].size == (LAYERS, EXPERTS, 64, 96)
    assert {(c.offsets, c.sizes) for c in md.tensors[fc1].chunks if c.offsets[:2] == (1, 3)} == {
        ((1, 3, 0, 0), (1, 1, 96, 64)), ((1, 3, 96, 0), (1, 1, 96, 64))}
    assert md.tensors["decoder.layers.mlp.router.weight"].size == (LAYERS, EXPERTS, 64)
    assert "decoder.layers.mlp.linear_fc1.layer_norm_weight" in md.tensors
    assert "decoder.layers.mlp.experts.experts.linear_fc2._extra_state/shard_1.3_2.4" in md.byte_items
    qwen = read_metadata(str(saved_tp1["qwen2_moe"]))
    assert qwen.tensors["decoder.layers.mlp.shared_experts.linear_fc1.weight"].size == (LAYERS, 96, 64)
    assert qwen.tensors["decoder.layers.mlp.shared_experts.gate_weight"].size == (LAYERS, 1, 64)

    tp2 = read_metadata(str(torchrun_moe["saved"]["qwen2_moe"]))
    chunks = {(c.offsets, c.sizes) for c in tp2.tensors[fc1].chunks if c.offsets[:2] == (0, 2)}
    assert chunks == {((0, 2, r, 0), (1, 1, 16, 64)) for r in (0, 16, 32, 48)}  # gate_0, gate_1, up_0, up_1
    ep2 = read_metadata(str(torchrun_moe["saved"]["mixtral"]))
    files = {c.offsets[1]: c.location.relative_path for c in ep2.tensors[fc2].chunks}
    assert files[0] != files[3]  # experts 0-1 saved by EP rank 0, 2-3 by EP rank 1


# ---- Megatron-Core -> pyconv -> HF ------------------------------------------------------------------

@needs_megatron
@pytest.mark.parametrize("family", FAMILIES)
def test_megatron_core_moe_save_tp1_converts_to_hf(moe_models, saved_tp1, tmp_path, family):
    import pyconv

    info = pyconv.open(saved_tp1[family]).summary()
    assert (info["format"], info["family"], info["config_from"]) == ("torch_dist", family, "config.json")
    pyconv.reshard(saved_tp1[family], tmp_path / "hf", to="hf")
    assert_hf_output(*moe_models[family], tmp_path / "hf")


@needs_megatron
@pytest.mark.parametrize("family", FAMILIES)
def test_megatron_core_moe_save_torchrun_converts_to_hf(moe_models, torchrun_moe, tmp_path, family):
    import pyconv

    pyconv.reshard(torchrun_moe["saved"][family], tmp_path / "hf", to="hf")
    assert_hf_output(*moe_models[family], tmp_path / "hf")


# ---- pyconv -> Megatron-Core and PyTorch DCP -------------------------------------------------------

@needs_megatron
@pytest.mark.parametrize("family", FAMILIES)
def test_megatron_core_loads_pyconv_moe_output_tp1(moe_models, pyconv_moe, family):
    model, src = moe_models[family]
    ids = example_input(model)
    with mh.megatron_parallel(1):
        got = megatron_load_logits(pyconv_moe / f"{family}_local" / "release", src, 1, ids)
    assert (got - hf_logits(model, ids)).abs().max().item() < ATOL


@needs_megatron
@pytest.mark.parametrize("tp, ep", [(1, 2), (2, 1)])
@pytest.mark.parametrize("family", FAMILIES)
def test_megatron_core_loads_pyconv_moe_output_torchrun(moe_models, torchrun_moe, family, tp, ep):
    model = moe_models[family][0]
    got = torchrun_moe["logits"][(family, tp, ep)]
    assert (got - hf_logits(model, example_input(model))).abs().max().item() < ATOL


@needs_megatron
@pytest.mark.parametrize("family", FAMILIES)
def test_pytorch_dcp_reads_pyconv_moe_output_as_megatron_wrote_it(saved_tp1, pyconv_moe, family):
    import torch
    import torch.distributed.checkpoint as dcp

    from pyconv.io.dcp import read_metadata

    ours_dir = pyconv_moe / f"{family}_local" / "release"
    ours, theirs = read_metadata(str(ours_dir)), read_metadata(str(saved_tp1[family]))
    assert set(ours.tensors) == set(theirs.tensors) and set(theirs.byte_items) <= set(ours.byte_items)
    got = {k: torch.full(t.size, float("nan")) for k, t in ours.tensors.items()}
    want = {k: torch.full(t.size, float("nan")) for k, t in theirs.tensors.items()}
    dcp.load(got, checkpoint_id=str(ours_dir))
    dcp.load(want, checkpoint_id=str(saved_tp1[family]))
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_transformer_engine_naming_keeps_the_moe_norm_apart(pyconv_moe):
    """TransformerEngine's MoE layer spec has a separate pre-MLP norm module (nothing to fuse it
    into): its key is decoder.layers.pre_mlp_layernorm.weight; everything else as the local spec."""
    from pyconv.io.dcp import read_metadata

    te = read_metadata(str(pyconv_moe / "mixtral_te" / "release"))
    local = read_metadata(str(pyconv_moe / "mixtral_local" / "release"))
    assert set(te.tensors) ^ set(local.tensors) == {"decoder.layers.pre_mlp_layernorm.weight",
                                                    "decoder.layers.mlp.linear_fc1.layer_norm_weight"}


# ---- round trips ---------------------------------------------------------------------------------

@pytest.mark.parametrize("naming", ["local", "te"])
@pytest.mark.parametrize("family", FAMILIES)
def test_hf_torch_dist_hf_roundtrip(moe_models, pyconv_moe, tmp_path, family, naming):
    import json

    import pyconv

    model, src = moe_models[family]
    ckpt = pyconv_moe / f"{family}_{naming}"
    assert pyconv.open(ckpt).summary()["config_from"] == "common.pt args"
    pyconv.reshard(ckpt, tmp_path / "hf", to="hf")
    assert_hf_output(model, src, tmp_path / "hf")
    with open(f"{src}/config.json") as f:
        original = json.load(f)
    restored = json.loads((tmp_path / "hf" / "config.json").read_text())
    # The family's Megatron -> HF config spells out what the source left None (Mixtral's head_dim).
    assert {k: restored.get(k) for k, v in original.items() if v is not None} == \
        {k: v for k, v in original.items() if v is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_torch_dist_to_megatron_tp_ep_to_hf(moe_models, pyconv_moe, tmp_path, family):
    """torch_dist -> Megatron (tp=2, ep=2) -> HF, and -> torch_dist again: bit for bit."""
    import pyconv
    from pyconv.io.dcp import read_metadata

    model, src = moe_models[family]
    pyconv.reshard(pyconv_moe / f"{family}_te", tmp_path / "meg", to="megatron", tp=2, ep=2)
    assert pyconv.open(tmp_path / "meg").summary()["ep"] == 2
    pyconv.reshard(tmp_path / "meg", tmp_path / "hf", to="hf")
    assert_hf_output(model, src, tmp_path / "hf")
    pyconv.reshard(tmp_path / "meg", tmp_path / "td", to="torch_dist")
    first, again = tmp_path / "td" / "release", pyconv_moe / f"{family}_te" / "release"
    assert read_metadata(str(first)).tensors.keys() == read_metadata(str(again)).tensors.keys()
    data = sorted(p.name for p in first.glob("*.distcp"))
    assert data == sorted(p.name for p in again.glob("*.distcp")) and data
    assert all((first / name).read_bytes() == (again / name).read_bytes() for name in data)


# ---- bad input -------------------------------------------------------------------------------------

def test_expert_count_mismatch_names_the_key(moe_models, pyconv_moe, tmp_path):
    import json
    import shutil

    import pyconv
    from pyconv.errors import FormatError

    ckpt = tmp_path / "ckpt"
    shutil.copytree(pyconv_moe / "mixtral_te" / "release", ckpt)
    (ckpt / "common.pt").unlink()
    with open(f"{moe_models['mixtral'][1]}/config.json") as f:
        config = json.load(f)
    config["num_local_experts"] = 8
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(FormatError, match=r"'decoder\.layers\.mlp\.router\.weight' has size \[2, 4, 64\], expected "
                                          r"\[2, 8, 64\] .*experts 8, moe_ffn 96"):
        pyconv.open(ckpt)


# ---- heterogeneous layers: DeepSeek-V3 (dense first layer, MoE after, multi-latent attention) -------------

def _deepseek_config():
    import transformers

    return transformers.DeepseekV3Config(
        vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
        first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=16, n_group=2, topk_group=1, max_position_embeddings=64)


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    """A tiny DeepSeek-V3 (HF), Megatron-Core's own torch_dist save of it (in this process, local
    spec) and pyconv's torch_dist output for the local spec."""
    import shutil

    import torch
    import transformers

    import pyconv

    if not mh.megatron_available():
        pytest.skip("megatron-core is not installed")
    root = tmp_path_factory.mktemp("torch_dist_deepseek")
    torch.manual_seed(7)
    model = transformers.AutoModelForCausalLM.from_config(_deepseek_config()).eval()
    with torch.no_grad():  # non-trivial norms and score-correction biases
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    model.save_pretrained(root / "hf")
    with mh.megatron_parallel(1):
        megatron_save(root / "hf", root / "saved", 1)
    shutil.copy(root / "hf" / "config.json", root / "saved" / "config.json")
    pyconv.reshard(root / "hf", root / "pyconv", to="torch_dist", megatron_naming="local")
    return model, str(root / "hf"), root / "saved", root / "pyconv"


@needs_megatron
def test_megatron_core_saves_heterogeneous_layers_under_per_layer_keys(deepseek):
    """What the reader relies on: with dense and MoE layers Megatron-Core 0.16 gives every layer
    its own keys (no layer axis; routed experts keep their expert axis), extra state
    `shard_0_1` per module and `shard_{e}_{E}` per expert; pyconv writes the same keys."""
    from pyconv.io.dcp import read_metadata

    _, _, saved, ours = deepseek
    md = read_metadata(str(saved))
    assert "decoder.layers.0.mlp.linear_fc1.weight" in md.tensors  # the dense layer
    assert "decoder.layers.1.mlp.linear_fc1.weight" not in md.tensors
    assert md.tensors["decoder.layers.2.mlp.experts.experts.linear_fc1.weight"].size == (4, 64, 64)
    assert md.tensors["decoder.layers.1.self_attention.linear_q_down_proj.weight"].size == (32, 64)
    assert not any(k.startswith("decoder.layers.mlp") for k in md.tensors)
    assert "decoder.layers.2.mlp.experts.experts.linear_fc2._extra_state/shard_3_4" in md.byte_items
    mine = read_metadata(str(ours / "release"))
    assert set(mine.tensors) == set(md.tensors) and set(md.byte_items) <= set(mine.byte_items)
    assert all(mine.tensors[k].size == md.tensors[k].size for k in md.tensors)


@needs_megatron
def test_megatron_core_deepseek_save_converts_to_hf(deepseek, tmp_path):
    import pyconv

    model, src, saved, _ = deepseek
    assert pyconv.open(saved).summary()["family"] == "deepseek_v3"
    pyconv.reshard(saved, tmp_path / "hf", to="hf")
    assert_hf_output(model, src, tmp_path / "hf")


@needs_megatron
def test_megatron_core_loads_pyconv_deepseek_output(deepseek):
    model, src, _, ours = deepseek
    ids = example_input(model)
    with mh.megatron_parallel(1):
        got = megatron_load_logits(ours / "release", src, 1, ids)
    assert (got - hf_logits(model, ids)).abs().max().item() < ATOL


def test_deepseek_torch_dist_roundtrip_both_namings(deepseek, tmp_path):
    import pyconv

    model, src, _, ours = deepseek
    pyconv.reshard(ours, tmp_path / "hf", to="hf")
    assert_hf_output(model, src, tmp_path / "hf")
    pyconv.reshard(src, tmp_path / "te", to="torch_dist")
    pyconv.reshard(tmp_path / "te", tmp_path / "hf_te", to="hf")
    assert_hf_output(model, src, tmp_path / "hf_te")
