"""LoRA adapters made by Hugging Face PEFT, merged while converting (#21): the merged weights equal
PEFT's merge_and_unload bit for bit (fp32), transformers loads the output with the same logits,
the merge cuts with the weight (Megatron tp 2 and back equals merging straight to HF), adapters
apply in order, and what pyconv does not merge is refused by name."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
if importlib.util.find_spec("peft") is None:  # found, not imported: peft imports triton, which
    pytest.skip("peft is not installed", allow_module_level=True)  # test_cuda_path must configure first
from safetensors.torch import load_file  # noqa: E402

import pyconv  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"]


def _llama():
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def _adapter(base: str, out: str, seed: int, **options) -> str:
    """A PEFT adapter on every targeted module, with nonzero B (init_lora_weights=False)."""
    import peft

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM.from_pretrained(base)
    config = peft.LoraConfig(init_lora_weights=False, target_modules=TARGETS, **options)
    peft_model = peft.get_peft_model(model, config)
    if config.modules_to_save:
        with torch.no_grad():
            peft_model.base_model.model.lm_head.modules_to_save.default.weight.mul_(1.5)
    peft_model.save_pretrained(out)
    return out


def _peft_merged(base: str, *adapters: str, model_class=None):
    """PEFT's merge_and_unload of the adapters in order, and for each merged weight the size of
    its delta's terms, sum over adapters of scaling * (|B| @ |A|) (transposed as the delta is): the
    scale at which the order of a product's sums can show."""
    import peft

    model = (model_class or transformers.LlamaForCausalLM).from_pretrained(base)
    magnitudes: dict = {}
    for adapter in adapters:
        wrapped = peft.PeftModel.from_pretrained(model, adapter)
        for name, module in wrapped.named_modules():
            for a_key, b_key in (("lora_A", "lora_B"), ("lora_embedding_A", "lora_embedding_B")):
                if "default" not in getattr(module, a_key, {}):
                    continue
                a, b = getattr(module, a_key)["default"], getattr(module, b_key)["default"]
                a, b = (a.weight if hasattr(a, "weight") else a), (b.weight if hasattr(b, "weight") else b)
                term = (b.detach().abs() @ a.detach().abs()) * module.scaling["default"]
                if a_key == "lora_embedding_A" or getattr(module, "fan_in_fan_out", False):
                    term = term.T
                weight = name[len("base_model.model."):] + ".weight"
                magnitudes[weight] = magnitudes.get(weight, 0) + term
        model = wrapped.merge_and_unload()
    model.lora_magnitudes = magnitudes
    return model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = str(root / "base")
    _llama().save_pretrained(base)
    adapters = {
        "plain": _adapter(base, str(root / "plain"), 1, r=4, lora_alpha=8, rank_pattern={"down_proj": 2},
                          alpha_pattern={"layers.1.self_attn.q_proj": 3}, modules_to_save=["lm_head"]),
        "rslora": _adapter(base, str(root / "rslora"), 2, r=8, lora_alpha=16, use_rslora=True),
        "second": _adapter(base, str(root / "second"), 3, r=2, lora_alpha=5),
    }
    return root, base, adapters


def _ulp(x):
    return torch.nextafter(x.abs(), torch.tensor(float("inf"), dtype=x.dtype)) - x.abs()


def _assert_close_to_peft(ours: dict, reference: dict, base: dict, magnitudes: dict | None = None):
    """Every merged tensor within 2 ulps of PEFT's, an ulp taken at the largest of the merged value,
    the weight and the delta's terms (magnitudes): torch's CPU matmul sums B @ A in an order that
    depends on the shapes (fma in k order, mul+add for matrices of < 4 rows, blocked sums), so
    where terms cancel, ulps of the result alone would measure that order, not the merge.
    Unmerged tensors equal bit for bit; at these shapes most merged ones do too (counted)."""
    assert set(ours) == set(reference)
    exact = 0
    for name, expected in reference.items():
        got = ours[name]
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        if name in base and torch.equal(base[name], expected):
            assert torch.equal(got, expected), f"{name}: not merged, yet changed"
            continue
        scale = torch.maximum(expected.abs(), (expected - base[name]).abs()) if name in base else expected.abs()
        if magnitudes and name in magnitudes:
            scale = torch.maximum(scale, magnitudes[name].to(scale.dtype))
        worst = ((got - expected).abs() / _ulp(scale)).max().item()
        assert worst <= 2, f"{name}: {worst} ulps from PEFT's"
        exact += torch.equal(got, expected)
    return exact


def _assert_state_dicts_equal(ours: dict, reference: dict):
    assert set(ours) == set(reference)
    for name, expected in reference.items():
        got = ours[name]
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        differ = (got != expected).sum().item()
        assert differ == 0, f"{name}: {differ} elements differ, max {(got - expected).abs().max().item()}"


@pytest.mark.parametrize("which", ["plain", "rslora"])
def test_merged_hf_output_is_peft_merge_and_unload(llama, which, tmp_path):
    root, base, adapters = llama
    out = str(tmp_path / "out")
    report = pyconv.reshard(base, out, to="hf", merge_lora=[adapters[which]])
    reference = _peft_merged(base, adapters[which])
    _assert_close_to_peft(load_file(os.path.join(out, "model.safetensors")), reference.state_dict(),
                          load_file(os.path.join(base, "model.safetensors")), reference.lora_magnitudes)
    loaded, info = transformers.LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (loaded(ids).logits - reference(ids).logits).abs().max().item() <= 1e-5
    note = next(n for n in report.plan.notes if n.startswith("LoRA adapter"))
    assert f"merged into {15 if which == 'rslora' else 16} tensors" in note, note


def test_a_wrong_scale_would_be_seen(llama, tmp_path):
    """rsLoRA's alpha / sqrt(r) against alpha / r: the two merges differ, so the equality above
    pins the scale."""
    root, base, adapters = llama
    config_path = os.path.join(adapters["rslora"], "adapter_config.json")
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    config = json.load(open(config_path))
    config["use_rslora"] = False
    (wrong / "adapter_config.json").write_text(json.dumps(config))
    os.symlink(os.path.join(adapters["rslora"], "adapter_model.safetensors"), wrong / "adapter_model.safetensors")
    pyconv.reshard(base, str(tmp_path / "a"), to="hf", merge_lora=[adapters["rslora"]])
    pyconv.reshard(base, str(tmp_path / "b"), to="hf", merge_lora=[str(wrong)])
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], b["model.layers.0.self_attn.q_proj.weight"])


def test_adapters_merge_in_order(llama, tmp_path):
    root, base, adapters = llama
    out = str(tmp_path / "out")
    pyconv.reshard(base, out, to="hf", merge_lora=[adapters["plain"], adapters["second"]])
    reference = _peft_merged(base, adapters["plain"], adapters["second"])
    _assert_close_to_peft(load_file(os.path.join(out, "model.safetensors")), reference.state_dict(),
                          load_file(os.path.join(base, "model.safetensors")), reference.lora_magnitudes)


def test_merge_to_megatron_tp2_and_back_equals_merge_to_hf(llama, tmp_path):
    root, base, adapters = llama
    straight, meg, back = (str(tmp_path / n) for n in ("straight", "meg", "back"))
    pyconv.reshard(base, straight, to="hf", merge_lora=[adapters["plain"], adapters["second"]])
    pyconv.reshard(base, meg, to="megatron", tp=2, merge_lora=[adapters["plain"], adapters["second"]])
    pyconv.reshard(meg, back, to="hf")
    a = load_file(os.path.join(straight, "model.safetensors"))
    b = load_file(os.path.join(back, "model.safetensors"))
    _assert_state_dicts_equal(b, a)


def test_merge_to_torch_dist_and_back_equals_merge_to_hf(llama, tmp_path):
    root, base, adapters = llama
    straight, dist, back = (str(tmp_path / n) for n in ("straight", "dist", "back"))
    pyconv.reshard(base, straight, to="hf", merge_lora=[adapters["plain"]])
    pyconv.reshard(base, dist, to="torch_dist", merge_lora=[adapters["plain"]])
    pyconv.reshard(dist, back, to="hf")
    _assert_state_dicts_equal(load_file(os.path.join(back, "model.safetensors")),
                              load_file(os.path.join(straight, "model.safetensors")))


def test_merge_from_a_megatron_source(llama, tmp_path):
    """The adapter names HF modules; a Megatron tp 2 source's canonical tensors carry those names,
    each weight in two shards, each shard merged with its rows of B (or columns of A)."""
    root, base, adapters = llama
    meg, out, straight = (str(tmp_path / n) for n in ("meg", "out", "straight"))
    pyconv.reshard(base, meg, to="megatron", tp=2)
    pyconv.reshard(meg, out, to="hf", merge_lora=[adapters["plain"]])
    pyconv.reshard(base, straight, to="hf", merge_lora=[adapters["plain"]])
    _assert_state_dicts_equal(load_file(os.path.join(out, "model.safetensors")),
                              load_file(os.path.join(straight, "model.safetensors")))


def test_dry_run_names_the_tensors_it_changes(llama, tmp_path):
    root, base, adapters = llama
    proc = subprocess.run([sys.executable, "-m", "pyconv", "reshard", base, str(tmp_path / "out"), "--dry-run",
                           "--merge-lora", adapters["second"]], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "LoRA adapter" in proc.stdout and "merged into 15 tensors" in proc.stdout
    assert "model.layers.0.mlp.down_proj.weight" in proc.stdout
    assert not os.path.exists(tmp_path / "out")


def _edited_adapter(src: str, dst, **config_changes) -> str:
    dst.mkdir()
    config = json.load(open(os.path.join(src, "adapter_config.json")))
    config.update(config_changes)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    os.symlink(os.path.join(src, "adapter_model.safetensors"), dst / "adapter_model.safetensors")
    return str(dst)


@pytest.mark.parametrize("change, message", [
    ({"use_dora": True}, "DoRA (use_dora) adapters are not merged yet"),
    ({"lora_bias": True}, "LoRA biases (lora_bias) are not merged yet"),
    ({"peft_type": "IA3"}, "peft_type 'IA3': pyconv merges LORA adapters only"),
    ({"r": 3}, "has rank 2, its config says 3"),
    ({"rank_pattern": {"(": 2}}, "rank_pattern key '(' is not a regular expression"),
])
def test_what_is_not_merged_is_refused_by_name(llama, tmp_path, change, message):
    root, base, adapters = llama
    adapter = _edited_adapter(adapters["second"], tmp_path / "adapter", **change)
    proc = subprocess.run([sys.executable, "-m", "pyconv", "reshard", base, str(tmp_path / "out"),
                           "--merge-lora", adapter], capture_output=True, text=True)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "out")


def test_an_adapter_for_another_model_is_refused(llama, tmp_path):
    root, base, adapters = llama
    other = tmp_path / "other"
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    small = str(tmp_path / "small")
    transformers.LlamaForCausalLM(config).save_pretrained(small)
    with pytest.raises(pyconv.PyconvError, match="it adapts 'model.layers.1.*which .* does not have"):
        pyconv.reshard(small, str(other), to="hf", merge_lora=[adapters["second"]])
    with pytest.raises(pyconv.FormatError, match="no adapter_config.json"):
        pyconv.reshard(base, str(other), to="hf", merge_lora=[base])


def test_moe_adapter_merges_through_expert_parallel_megatron(tmp_path):
    """Qwen2-MoE with adapters on attention, the shared expert and its gate (the Linear modules
    PEFT targets by name in transformers 5: the router is its own module, the routed experts fused
    parameters, reached only by target_parameters, which pyconv refuses):
    merged to HF it equals PEFT's merge_and_unload; through Megatron tp 2 ep 2 and back, the same bytes."""
    import peft

    config = transformers.Qwen2MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                                         shared_expert_intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                         tie_word_embeddings=False)
    torch.manual_seed(0)
    base = str(tmp_path / "base")
    transformers.Qwen2MoeForCausalLM(config).save_pretrained(base)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "shared_expert_gate"]
    model = peft.get_peft_model(transformers.Qwen2MoeForCausalLM.from_pretrained(base),
                                peft.LoraConfig(r=4, lora_alpha=6, init_lora_weights=False, target_modules=targets))
    adapter = str(tmp_path / "adapter")
    model.save_pretrained(adapter)
    reference = _peft_merged(base, adapter, model_class=transformers.Qwen2MoeForCausalLM)
    straight, meg, back = (str(tmp_path / n) for n in ("straight", "meg", "back"))
    report = pyconv.reshard(base, straight, to="hf", merge_lora=[adapter])
    assert "merged into 16 tensors" in next(n for n in report.plan.notes if n.startswith("LoRA"))
    merged = transformers.Qwen2MoeForCausalLM.from_pretrained(straight)
    ours, theirs = merged.state_dict(), reference.state_dict()
    assert set(ours) == set(theirs)
    original = transformers.Qwen2MoeForCausalLM.from_pretrained(base).state_dict()
    _assert_close_to_peft(ours, theirs, original, reference.lora_magnitudes)
    pyconv.reshard(base, meg, to="megatron", tp=2, ep=2, merge_lora=[adapter])
    pyconv.reshard(meg, back, to="hf")
    _assert_state_dicts_equal(load_file(os.path.join(back, "model.safetensors")),
                              load_file(os.path.join(straight, "model.safetensors")))


def _write_adapter(path, tensors: dict, **config):
    from safetensors.torch import save_file

    os.makedirs(path)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", **config}, f)
    return str(path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wide_weights_merge_in_column_tiles_as_torch_multiplies(tmp_path, dtype):
    """A weight wider than the core's 2048-column tile, bf16 factors on an fp32 or bf16 base:
    W + (B @ A) * scale in fp32, rounded once; against torch's own product (the same sums at this
    shape; within the product's last rounding wherever torch sums otherwise)."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(8, 5000, generator=gen).to(dtype)
    a = torch.randn(3, 5000, generator=gen).to(torch.bfloat16)
    b = torch.randn(8, 3, generator=gen).to(torch.bfloat16)
    os.makedirs(tmp_path / "base")
    save_file({"model.w.weight": weight}, str(tmp_path / "base" / "model.safetensors"))
    adapter = _write_adapter(tmp_path / "adapter", {"base_model.model.model.w.lora_A.weight": a,
                                                    "base_model.model.model.w.lora_B.weight": b}, r=3, lora_alpha=7)
    pyconv.reshard(str(tmp_path / "base"), str(tmp_path / "out"), to="hf", merge_lora=[adapter])
    got = load_file(str(tmp_path / "out" / "model.safetensors"))["model.w.weight"]
    delta = (b.float() @ a.float()) * (7 / 3)
    expected = (weight.float() + delta).to(dtype)
    assert got.dtype == dtype
    if dtype == torch.float32:
        assert ((got - expected).abs() / _ulp(torch.maximum(expected.abs(), delta.abs()))).max() <= 2
    else:  # one bf16 rounding of nearly the same fp32 sum: equal, or one bf16 ulp apart
        assert ((got.float() - expected.float()).abs() <= _ulp(expected).float()).all()


def test_a_rank_beyond_the_core_bound_is_refused(tmp_path):
    from safetensors.torch import save_file

    os.makedirs(tmp_path / "base")
    save_file({"model.w.weight": torch.zeros(2, 2)}, str(tmp_path / "base" / "model.safetensors"))
    adapter = _write_adapter(tmp_path / "adapter", {"base_model.model.model.w.lora_A.weight": torch.zeros(16385, 2),
                                                    "base_model.model.model.w.lora_B.weight": torch.zeros(2, 16385)},
                             r=16385, lora_alpha=1)
    with pytest.raises(pyconv.FormatError, match="has rank 16385; pyconv merges ranks 1 to 16384"):
        pyconv.reshard(str(tmp_path / "base"), str(tmp_path / "out"), to="hf", merge_lora=[adapter])


def test_a_bin_adapter_merges_as_its_safetensors_twin(llama, tmp_path):
    """adapter_model.bin (safe_serialization=False), read through the restricted unpickler."""
    import peft

    root, base, adapters = llama
    torch.manual_seed(3)
    model = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(base),
                                peft.LoraConfig(r=2, lora_alpha=5, init_lora_weights=False, target_modules=TARGETS))
    as_bin = str(tmp_path / "bin")
    model.save_pretrained(as_bin, safe_serialization=False)
    assert os.path.isfile(os.path.join(as_bin, "adapter_model.bin"))
    pyconv.reshard(base, str(tmp_path / "a"), to="hf", merge_lora=[as_bin])
    reference = _peft_merged(base, as_bin)
    _assert_close_to_peft(load_file(str(tmp_path / "a" / "model.safetensors")), reference.state_dict(),
                          load_file(os.path.join(base, "model.safetensors")), reference.lora_magnitudes)


def test_fan_in_fan_out_on_gpt2_conv1d(tmp_path):
    """GPT-2's Conv1D weights are stored [in, out]: PEFT's delta is (B @ A)^T (fan_in_fan_out)."""
    import peft

    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16)
    torch.manual_seed(0)
    base = str(tmp_path / "base")
    transformers.GPT2LMHeadModel(config).save_pretrained(base)
    model = peft.get_peft_model(transformers.GPT2LMHeadModel.from_pretrained(base),
                                peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, fan_in_fan_out=True,
                                                target_modules=["c_attn", "c_proj", "c_fc"]))
    adapter = str(tmp_path / "adapter")
    model.save_pretrained(adapter)
    reference = _peft_merged(base, adapter, model_class=transformers.GPT2LMHeadModel)
    pyconv.reshard(base, str(tmp_path / "out"), to="hf", merge_lora=[adapter])
    ours = load_file(str(tmp_path / "out" / "model.safetensors"))
    theirs = {n: t for n, t in reference.state_dict().items() if n in ours}
    _assert_close_to_peft(ours, theirs, load_file(os.path.join(base, "model.safetensors")), reference.lora_magnitudes)
    # Megatron holds these weights transposed ([out, in]): a delta over a transposed copy is refused by name.
    with pytest.raises(pyconv.PyconvError, match="cannot be merged into a transposed"):
        pyconv.reshard(base, str(tmp_path / "meg"), to="megatron", merge_lora=[adapter])


def test_an_adapter_given_as_a_model_says_what_to_do(llama, tmp_path):
    root, base, adapters = llama
    proc = subprocess.run([sys.executable, "-m", "pyconv", "inspect", adapters["second"]], capture_output=True, text=True)
    assert proc.returncode == 2 and "a PEFT adapter, not a model" in proc.stderr and "--merge-lora" in proc.stderr
