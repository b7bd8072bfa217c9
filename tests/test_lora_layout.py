"""A PEFT adapter carried to Megatron-Bridge's CanonicalLoRA layout and back (#21 item 3): the round
trip is bitwise, and each rank's adapter pieces, combined as Megatron-Bridge's ParallelLinearAdapter
combines them (linear_in gathered under a column-parallel base, reduced under a row-parallel one),
give exactly that rank's shard of the merged model pyconv writes with --merge-lora."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
if importlib.util.find_spec("peft") is None:  # found, not imported (see test_lora.py)
    pytest.skip("peft is not installed", allow_module_level=True)
from safetensors.torch import load_file  # noqa: E402

import pyconv  # noqa: E402
from pyconv.lora_layout import convert_adapter  # noqa: E402

HEADS, GROUPS, HEAD_DIM, TP = 4, 2, 8, 2
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    import peft

    root = tmp_path_factory.mktemp("lora_layout")
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=HEADS * HEAD_DIM, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=GROUPS,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    base = str(root / "base")
    transformers.LlamaForCausalLM(config).save_pretrained(base)
    torch.manual_seed(1)
    model = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(base),
                                peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=LINEARS))
    adapter = str(root / "adapter")
    model.save_pretrained(adapter)
    megatron = str(root / "adapter-meg")
    convert_adapter(adapter, megatron, to="megatron", base=base, tp=TP)
    return root, base, adapter, megatron


def _rank(path: str, t: int) -> dict:
    return torch.load(os.path.join(path, "release", f"mp_rank_{t:02d}", "model_optim_rng.pt"), weights_only=False)


def test_round_trip_is_bitwise(adapted, tmp_path):
    root, base, adapter, megatron = adapted
    back = str(tmp_path / "back")
    proc = subprocess.run([sys.executable, "-m", "pyconv", "lora", megatron, back, "--to", "peft"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    original, returned = (load_file(os.path.join(d, "adapter_model.safetensors")) for d in (adapter, back))
    assert list(original) == list(returned)
    for name in original:
        assert torch.equal(original[name], returned[name]), name
    assert json.load(open(os.path.join(back, "adapter_config.json"))) == \
        json.load(open(os.path.join(adapter, "adapter_config.json")))
    # laid out as PEFT's save_file lays it out: the very same bytes
    assert open(os.path.join(back, "adapter_model.safetensors"), "rb").read() == \
        open(os.path.join(adapter, "adapter_model.safetensors"), "rb").read()


def test_megatron_bridge_names_shapes_and_scale(adapted):
    root, base, adapter, megatron = adapted
    rank = _rank(megatron, 0)
    meta = rank["lora"]
    assert (meta["family"], meta["dim"], meta["alpha"], meta["tp"]) == ("llama", 4, 8, TP)
    prefix = "decoder.layers.1."
    shapes = {k[len(prefix):]: tuple(v.shape) for k, v in rank["model"].items() if k.startswith(prefix)}
    q, kv, hidden, ffn = HEADS * HEAD_DIM, GROUPS * HEAD_DIM, HEADS * HEAD_DIM, 48
    assert shapes == {
        # column-parallel base: linear_in split along dim (gathered in forward), linear_out along out
        "self_attention.linear_qkv.adapter.adapter_q.linear_in.weight": (4 // TP, hidden),
        "self_attention.linear_qkv.adapter.adapter_q.linear_out.weight": (q // TP, 4),
        "self_attention.linear_qkv.adapter.adapter_k.linear_in.weight": (4 // TP, hidden),
        "self_attention.linear_qkv.adapter.adapter_k.linear_out.weight": (kv // TP, 4),
        "self_attention.linear_qkv.adapter.adapter_v.linear_in.weight": (4 // TP, hidden),
        "self_attention.linear_qkv.adapter.adapter_v.linear_out.weight": (kv // TP, 4),
        "mlp.linear_fc1.adapter.adapter_gate.linear_in.weight": (4 // TP, hidden),
        "mlp.linear_fc1.adapter.adapter_gate.linear_out.weight": (ffn // TP, 4),
        "mlp.linear_fc1.adapter.adapter_up.linear_in.weight": (4 // TP, hidden),
        "mlp.linear_fc1.adapter.adapter_up.linear_out.weight": (ffn // TP, 4),
        # row-parallel base: linear_in split along in, linear_out along out
        "self_attention.linear_proj.adapter.linear_in.weight": (4, q // TP),
        "self_attention.linear_proj.adapter.linear_out.weight": (hidden // TP, 4),
        "mlp.linear_fc2.adapter.linear_in.weight": (4, ffn // TP),
        "mlp.linear_fc2.adapter.linear_out.weight": (hidden // TP, 4),
    }


def test_each_rank_reproduces_its_shard_of_the_merged_model(adapted, tmp_path):
    root, base, adapter, megatron = adapted
    plain, merged = str(tmp_path / "plain"), str(tmp_path / "merged")
    pyconv.reshard(base, plain, to="megatron", tp=TP)
    pyconv.reshard(base, merged, to="megatron", tp=TP, merge_lora=[adapter])
    ranks = [_rank(megatron, t)["model"] for t in range(TP)]
    scale = 8 / 4

    def full(name, dim):  # a linear_in / linear_out gathered across the ranks
        return torch.cat([r[name] for r in ranks], dim=dim)

    for t in range(TP):
        ours, theirs = _rank(plain, t)["model"], _rank(merged, t)["model"]
        mine = ranks[t]
        for layer in range(2):
            p = f"decoder.layers.{layer}."
            a = p + "self_attention.linear_qkv.adapter.adapter_"
            q, k, v = ((mine[a + s + ".linear_out.weight"] @ full(a + s + ".linear_in.weight", 0)) * scale
                       for s in ("q", "k", "v"))
            per_group = HEADS // GROUPS * HEAD_DIM  # Megatron's qkv rows: per local group, its q heads, k, v
            delta = torch.cat([torch.cat([q[g * per_group:(g + 1) * per_group], k[g * HEAD_DIM:(g + 1) * HEAD_DIM],
                                          v[g * HEAD_DIM:(g + 1) * HEAD_DIM]]) for g in range(GROUPS // TP)])
            name = p + "self_attention.linear_qkv.weight"
            assert torch.equal(ours[name] + delta, theirs[name]), (t, name)
            for linear in ("self_attention.linear_proj", "mlp.linear_fc2"):
                a = p + linear + ".adapter."
                delta = (full(a + "linear_out.weight", 0) @ mine[a + "linear_in.weight"]) * scale
                assert torch.equal(ours[p + linear + ".weight"] + delta, theirs[p + linear + ".weight"]), (t, linear)
            a = p + "mlp.linear_fc1.adapter.adapter_"
            gate, up = ((mine[a + s + ".linear_out.weight"] @ full(a + s + ".linear_in.weight", 0)) * scale
                        for s in ("gate", "up"))
            name = p + "mlp.linear_fc1.weight"
            assert torch.equal(ours[name] + torch.cat([gate, up]), theirs[name]), (t, name)


def test_what_the_layout_cannot_hold_is_refused(adapted, tmp_path):
    import peft

    root, base, adapter, megatron = adapted
    with_embedding = str(tmp_path / "embedding")
    model = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(base),
                                peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                target_modules=["q_proj", "embed_tokens"]))
    model.save_pretrained(with_embedding)
    proc = subprocess.run([sys.executable, "-m", "pyconv", "lora", with_embedding, str(tmp_path / "out"),
                           "--to", "megatron", "--base", base], capture_output=True, text=True)
    assert proc.returncode == 2 and "holds adapter factors only" in proc.stderr, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "pyconv", "lora", adapter, str(tmp_path / "out"), "--to", "megatron",
                           "--base", base, "--tp", "8"], capture_output=True, text=True)
    assert proc.returncode == 2 and "do not divide into 8 ranks" in proc.stderr, proc.stderr
    assert not os.path.exists(tmp_path / "out")


def test_hostile_megatron_adapters_are_refused_by_name(adapted, tmp_path):
    """Rank files that disagree, name no family, or hold factors of other shapes: one line, exit 2."""
    root, base, adapter, megatron = adapted

    def edited(name, edit):
        copy = tmp_path / name
        import shutil

        shutil.copytree(megatron, copy)
        path = copy / "release" / "mp_rank_01" / "model_optim_rng.pt"
        obj = torch.load(path, weights_only=False)
        edit(obj)
        torch.save(obj, path)
        return str(copy)

    def shrink(obj):
        key = next(k for k in obj["model"] if k.endswith("linear_out.weight"))
        obj["model"][key] = obj["model"][key][:1].clone()

    cases = {
        "shapes": (shrink, "differ in shape or dtype"),
        "family": (lambda obj: obj["lora"].update(family=7), "disagree on the adapter"),
        "foreign": (lambda obj: obj["model"].update({"decoder.layers.0.self_attention.linear_qkv.weight":
                                                     torch.zeros(2, 2)}), "holds other adapter tensors"),
    }
    for name, (edit, message) in cases.items():
        proc = subprocess.run([sys.executable, "-m", "pyconv", "lora", edited(name, edit), str(tmp_path / f"out-{name}"),
                               "--to", "peft"], capture_output=True, text=True)
        assert proc.returncode == 2 and message in proc.stderr, (name, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and not os.path.exists(tmp_path / f"out-{name}")
