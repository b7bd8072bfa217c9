"""Legacy (pre-Megatron-Core) Megatron GPT and BERT checkpoints.

The fixtures are built here, independently of pyconv, with torch: a tiny HF model's weights
laid out as Megatron-LM's legacy GPTModel/BertModel saves them (nested state dicts under
`model.language_model`, QKV rows in the order of each checkpoint_version, vocabulary padded
with rows of noise, TP shards and PP stages, saved with torch.save) in the three containers
(a single .pt, a .zip holding release/mp_rank_00/model_optim_rng.pt, mp_rank directories).
transformers is the judge of the HF output: no missing or unexpected keys, logits equal to
the model the fixture was built from."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import zipfile
from argparse import Namespace

import pytest
import torch
import transformers

from conftest import flatten_state_dict

import pyconv
from pyconv.errors import FormatError, LayoutError

VOCAB, HIDDEN, HEADS, LAYERS, FFN, POSITIONS = 90, 48, 4, 4, 96, 32
DIVISIBLE_BY = 16  # padded vocab: 96 at tp 1 and 2


def _randomize_vectors(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "ln" in name or "LayerNorm" in name else 0.0))
    return model


def tiny_gpt2():
    """The GPT-2 the legacy checkpoints here are built from (other test modules build it too)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=POSITIONS, n_embd=HIDDEN, n_layer=LAYERS,
                                     n_head=HEADS, n_inner=FFN, activation_function="gelu_new")
    return _randomize_vectors(transformers.GPT2LMHeadModel(config).eval())


@pytest.fixture(scope="module")
def gpt2():
    return tiny_gpt2()


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(1)
    config = transformers.MegatronBertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                             num_attention_heads=HEADS, intermediate_size=FFN,
                                             max_position_embeddings=POSITIONS, type_vocab_size=2,
                                             layer_norm_eps=1e-5)
    return _randomize_vectors(transformers.MegatronBertForPreTraining(config).eval())


# ---- building legacy checkpoints with torch (the reference layout) ---------------------------

def _padded(vocab, tp):
    multiple = DIVISIBLE_BY * tp
    return -(-vocab // multiple) * multiple


def _qkv_shard(q, k, v, tp, rank, version):
    """Rank `rank`'s fused QKV ([out, ...] each) in the row order of checkpoint_version."""
    hn = HIDDEN // HEADS
    np_local = HEADS // tp
    rows = slice(rank * np_local * hn, (rank + 1) * np_local * hn)
    parts = [t[rows] for t in (q, k, v)]
    if version == 0:  # [3, np, hn]
        return torch.cat(parts).contiguous()
    heads = [p.reshape(np_local, hn, *p.shape[1:]) for p in parts]
    if version == 1.0:  # [np, hn, 3]
        return torch.stack(heads, dim=2).reshape(3 * np_local * hn, *q.shape[1:]).contiguous()
    return torch.stack(heads, dim=1).reshape(3 * np_local * hn, *q.shape[1:]).contiguous()  # [np, 3, hn]


def _split(t, tp, rank, dim):
    return torch.chunk(t, tp, dim=dim)[rank].contiguous()


def _put(tree, dotted, value):
    *path, leaf = dotted.split("/")
    for p in path:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def _layer_tensors(sd, family, i):
    """HF layer i as Megatron [out, in] tensors: (qkv parts (w, b), layer dict)."""
    if family == "gpt2":
        h = f"transformer.h.{i}."
        w, b = sd[h + "attn.c_attn.weight"].T, sd[h + "attn.c_attn.bias"]
        qkv_w, qkv_b = w.split(HIDDEN), b.split(HIDDEN)
        return qkv_w, qkv_b, {
            "input_layernorm": (sd[h + "ln_1.weight"], sd[h + "ln_1.bias"]),
            "self_attention.dense": (sd[h + "attn.c_proj.weight"].T, sd[h + "attn.c_proj.bias"]),
            "post_attention_layernorm": (sd[h + "ln_2.weight"], sd[h + "ln_2.bias"]),
            "mlp.dense_h_to_4h": (sd[h + "mlp.c_fc.weight"].T, sd[h + "mlp.c_fc.bias"]),
            "mlp.dense_4h_to_h": (sd[h + "mlp.c_proj.weight"].T, sd[h + "mlp.c_proj.bias"]),
        }
    h = f"bert.encoder.layer.{i}."
    qkv_w = [sd[h + f"attention.self.{n}.weight"] for n in ("query", "key", "value")]
    qkv_b = [sd[h + f"attention.self.{n}.bias"] for n in ("query", "key", "value")]
    return qkv_w, qkv_b, {
        "input_layernorm": (sd[h + "attention.ln.weight"], sd[h + "attention.ln.bias"]),
        "self_attention.dense": (sd[h + "attention.output.dense.weight"], sd[h + "attention.output.dense.bias"]),
        "post_attention_layernorm": (sd[h + "ln.weight"], sd[h + "ln.bias"]),
        "mlp.dense_h_to_4h": (sd[h + "intermediate.dense.weight"], sd[h + "intermediate.dense.bias"]),
        "mlp.dense_4h_to_h": (sd[h + "output.dense.weight"], sd[h + "output.dense.bias"]),
    }


def legacy_rank_dicts(model, family, tp, pp, version, dtype=torch.float32, old_names=False):
    """{(tp rank, pp rank): torch.save-able dict} as legacy Megatron-LM saves the model."""
    sd = {k: v.detach().to(dtype) for k, v in model.state_dict().items()}
    padded = _padded(VOCAB, tp)
    g = torch.Generator().manual_seed(7)
    noise = (torch.randn(padded - VOCAB, HIDDEN, generator=g) * 50).to(dtype)  # never to reach HF
    prefix = "bert.embeddings." if family == "bert" else "transformer."
    word = torch.cat([sd[prefix + ("word_embeddings.weight" if family == "bert" else "wte.weight")], noise])
    position = sd[prefix + ("position_embeddings.weight" if family == "bert" else "wpe.weight")]
    stack = "transformer" if old_names else "encoder"
    attention = "attention" if old_names else "self_attention"
    per_stage = LAYERS // pp
    args = Namespace(num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, ffn_hidden_size=FFN,
                     max_position_embeddings=POSITIONS, padded_vocab_size=padded,
                     make_vocab_size_divisible_by=DIVISIBLE_BY, tensor_model_parallel_size=tp,
                     pipeline_model_parallel_size=pp, layernorm_epsilon=1e-5,
                     params_dtype=dtype, fp16=dtype == torch.float16, bf16=dtype == torch.bfloat16)
    if family == "gpt2":
        args.orig_vocab_size = VOCAB  # as Hugging Face's GPT-2 converter records the true vocab
        args.openai_gelu, args.bias_gelu_fusion = True, False
    else:
        args.vocab_size = VOCAB
        args.tokenizer_type, args.bert_binary_head = "BertWordPieceLowerCase", True
    out = {}
    for p in range(pp):
        for t in range(tp):
            model_tree: dict = {}
            if p == 0:
                _put(model_tree, "language_model/embedding/word_embeddings/weight", _split(word, tp, t, 0))
                _put(model_tree, "language_model/embedding/position_embeddings/weight", position.clone())
                if family == "bert":
                    _put(model_tree, "language_model/embedding/tokentype_embeddings/weight",
                         sd["bert.embeddings.token_type_embeddings.weight"].clone())
            for local in range(per_stage):
                qkv_w, qkv_b, parts = _layer_tensors(sd, family, p * per_stage + local)
                base = f"language_model/{stack}/layers.{local}."
                _put(model_tree, base + "input_layernorm.weight", parts["input_layernorm"][0].clone())
                _put(model_tree, base + "input_layernorm.bias", parts["input_layernorm"][1].clone())
                _put(model_tree, base + f"{attention}.query_key_value.weight", _qkv_shard(*qkv_w, tp, t, version))
                _put(model_tree, base + f"{attention}.query_key_value.bias", _qkv_shard(*qkv_b, tp, t, version))
                _put(model_tree, base + f"{attention}.dense.weight", _split(parts["self_attention.dense"][0], tp, t, 1))
                _put(model_tree, base + f"{attention}.dense.bias", parts["self_attention.dense"][1].clone())
                _put(model_tree, base + "post_attention_layernorm.weight", parts["post_attention_layernorm"][0].clone())
                _put(model_tree, base + "post_attention_layernorm.bias", parts["post_attention_layernorm"][1].clone())
                _put(model_tree, base + "mlp.dense_h_to_4h.weight", _split(parts["mlp.dense_h_to_4h"][0], tp, t, 0))
                _put(model_tree, base + "mlp.dense_h_to_4h.bias", _split(parts["mlp.dense_h_to_4h"][1], tp, t, 0))
                _put(model_tree, base + "mlp.dense_4h_to_h.weight", _split(parts["mlp.dense_4h_to_h"][0], tp, t, 1))
                _put(model_tree, base + "mlp.dense_4h_to_h.bias", parts["mlp.dense_4h_to_h"][1].clone())
            if p == pp - 1:
                final = "bert.encoder.ln." if family == "bert" else "transformer.ln_f."
                _put(model_tree, f"language_model/{stack}/final_layernorm.weight", sd[final + "weight"].clone())
                _put(model_tree, f"language_model/{stack}/final_layernorm.bias", sd[final + "bias"].clone())
                if pp > 1:
                    _put(model_tree, "word_embeddings_for_head/weight", _split(word, tp, t, 0))
                if family == "bert":
                    _put(model_tree, "language_model/pooler/dense.weight", sd["bert.pooler.dense.weight"].clone())
                    _put(model_tree, "language_model/pooler/dense.bias", sd["bert.pooler.dense.bias"].clone())
                    c = "cls.predictions."
                    _put(model_tree, "lm_head/dense.weight", sd[c + "transform.dense.weight"].clone())
                    _put(model_tree, "lm_head/dense.bias", sd[c + "transform.dense.bias"].clone())
                    _put(model_tree, "lm_head/layernorm.weight", sd[c + "transform.LayerNorm.weight"].clone())
                    _put(model_tree, "lm_head/layernorm.bias", sd[c + "transform.LayerNorm.bias"].clone())
                    bias = torch.cat([sd[c + "bias"], noise[:, 0]])
                    _put(model_tree, "lm_head/bias", _split(bias, tp, t, 0))
                    _put(model_tree, "binary_head/weight", sd["cls.seq_relationship.weight"].clone())
                    _put(model_tree, "binary_head/bias", sd["cls.seq_relationship.bias"].clone())
            obj = {"model": model_tree, "args": args, "iteration": 0}
            if version != 0:  # version 0 files carry no checkpoint_version at all
                obj["checkpoint_version"] = version
            out[(t, p)] = obj
    return out


def save_legacy(rank_dicts, path, container):
    """Saves the rank dicts as a directory, a single .pt or a .zip; returns the path to convert."""
    tp = max(t for t, _ in rank_dicts) + 1
    pp = max(p for _, p in rank_dicts) + 1
    if container == "pt":
        assert tp == pp == 1
        file = f"{path}.pt"
        torch.save(rank_dicts[(0, 0)], file)
        return file
    if container == "zip":
        staging = f"{path}-staging"
        save_legacy(rank_dicts, staging, "dir")
        file = f"{path}.zip"
        with zipfile.ZipFile(file, "w", compression=zipfile.ZIP_STORED) as z:
            for dirpath, _, files in sorted(os.walk(staging)):
                for name in sorted(files):
                    full = os.path.join(dirpath, name)
                    z.write(full, os.path.relpath(full, staging))
        return file
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("release")
    for (t, p), obj in rank_dicts.items():
        rank_dir = os.path.join(path, "release", f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else ""))
        os.makedirs(rank_dir, exist_ok=True)
        torch.save(obj, os.path.join(rank_dir, "model_optim_rng.pt"))
    return str(path)


def _load_hf(cls, path):
    model, info = cls.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def _gpt2_logits(model):
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids).logits


def _bert_logits(model):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (2, 11), generator=g)
    types = torch.randint(0, 2, (2, 11), generator=g)
    with torch.no_grad():
        out = model(input_ids=ids, token_type_ids=types)
    return out.prediction_logits, out.seq_relationship_logits


# ---- legacy -> HF --------------------------------------------------------------------------

@pytest.mark.parametrize("version, tp, pp, container, old_names", [
    (0, 1, 1, "pt", False),
    (1.0, 1, 1, "zip", True),
    (3.0, 1, 1, "zip", False),
    (1.0, 2, 2, "dir", False),
    (0, 2, 1, "dir", True),
    (3.0, 2, 2, "dir", False),
    (2.0, 1, 2, "dir", False),
])
def test_legacy_gpt_to_hf_logits_equal(gpt2, tmp_path, version, tp, pp, container, old_names):
    src = save_legacy(legacy_rank_dicts(gpt2, "gpt2", tp, pp, version, old_names=old_names),
                      tmp_path / "legacy", container)
    ckpt = pyconv.open(src)
    assert (ckpt.format, ckpt.architecture) == ("megatron-legacy", "GPT2LMHeadModel")
    assert (ckpt.catalog.details["tp"], ckpt.catalog.details["pp"]) == (tp, pp)
    assert ckpt.shape("transformer.wte.weight") == (VOCAB, HIDDEN)  # padding rows dropped
    pyconv.reshard(src, tmp_path / "hf", to="hf")
    converted = _load_hf(transformers.GPT2LMHeadModel, tmp_path / "hf")
    assert converted.config.vocab_size == VOCAB and converted.config.activation_function == "gelu_new"
    assert torch.equal(_gpt2_logits(converted), _gpt2_logits(gpt2))


@pytest.mark.parametrize("version, tp, pp, container", [
    (0, 1, 1, "zip"),
    (1.0, 2, 2, "dir"),
    (3.0, 2, 1, "dir"),
    (2.0, 1, 1, "pt"),
    (0, 2, 2, "dir"),
])
def test_legacy_bert_to_hf_logits_equal(bert, tmp_path, version, tp, pp, container):
    src = save_legacy(legacy_rank_dicts(bert, "bert", tp, pp, version), tmp_path / "legacy", container)
    ckpt = pyconv.open(src)
    assert (ckpt.format, ckpt.architecture) == ("megatron-legacy", "MegatronBertForPreTraining")
    pyconv.reshard(src, tmp_path / "hf", to="hf")
    converted = _load_hf(transformers.MegatronBertForPreTraining, tmp_path / "hf")
    assert converted.config.vocab_size == VOCAB and converted.config.type_vocab_size == 2
    for ours, theirs in zip(_bert_logits(converted), _bert_logits(bert)):
        assert torch.equal(ours, theirs)


def test_legacy_fp16_shards_read_as_fp16(gpt2, tmp_path):
    src = save_legacy(legacy_rank_dicts(gpt2, "gpt2", 2, 1, 3.0, dtype=torch.float16), tmp_path / "legacy", "dir")
    pyconv.reshard(src, tmp_path / "hf", to="hf")
    converted = _load_hf(transformers.GPT2LMHeadModel, tmp_path / "hf")
    assert converted.config.dtype == torch.float16
    reference = {k: v.half() for k, v in gpt2.state_dict().items()}
    for name, tensor in converted.state_dict().items():
        if name in reference and not name.endswith(("attn.bias", "masked_bias")):
            assert torch.equal(tensor, reference[name]), name


# ---- HF -> legacy ----------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_hf_to_legacy_matches_the_reference_layout_and_round_trips(gpt2, bert, tmp_path, family):
    model, cls = ((gpt2, transformers.GPT2LMHeadModel) if family == "gpt2"
                  else (bert, transformers.MegatronBertForPreTraining))
    model.save_pretrained(tmp_path / "hf")
    pyconv.reshard(tmp_path / "hf", tmp_path / "legacy", to="megatron-legacy", tp=2, pp=2, dtype="bf16",
                   vocab_divisible_by=DIVISIBLE_BY)
    assert open(tmp_path / "legacy" / "latest_checkpointed_iteration.txt").read() == "release"
    # Each rank file holds, tensor for tensor, what the reference construction (version 3.0)
    # puts there, the vocab padding excepted (we repeat the last row, it holds noise).
    reference = legacy_rank_dicts(model, family, 2, 2, 3.0, dtype=torch.bfloat16)
    for (t, p), expected in reference.items():
        written = torch.load(tmp_path / "legacy" / "release" / f"mp_rank_{t:02d}_{p:03d}" / "model_optim_rng.pt",
                             weights_only=False)
        assert written["checkpoint_version"] == 3.0
        assert written["args"].padded_vocab_size == 96 and written["args"].orig_vocab_size == VOCAB
        assert written["args"].params_dtype == torch.bfloat16
        ours, theirs = flatten_state_dict(written["model"]), flatten_state_dict(expected["model"])
        assert list(ours) == list(theirs) or sorted(ours) == sorted(theirs)
        for name, tensor in theirs.items():
            if name.endswith(("word_embeddings.weight", "word_embeddings_for_head.weight", "lm_head.bias")) and t == 1:
                real = VOCAB - 48  # rank 1 holds rows 48..95: 42 real, then the last real row repeated
                assert torch.equal(ours[name][:real], tensor[:real]), (t, p, name)
                assert torch.equal(ours[name][real:], ours[name][real - 1:real].expand_as(ours[name][real:]))
            else:
                assert torch.equal(ours[name], tensor), (t, p, name)
    pyconv.reshard(tmp_path / "legacy", tmp_path / "back", to="hf")
    back = _load_hf(cls, tmp_path / "back")
    expected_sd = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    for name, tensor in back.state_dict().items():
        assert torch.equal(tensor, expected_sd[name]), name
    assert back.config.to_dict()["vocab_size"] == VOCAB


def test_cli_writes_legacy_tp2(gpt2, tmp_path):
    gpt2.save_pretrained(tmp_path / "hf")
    result = subprocess.run([sys.executable, "-m", "pyconv", "reshard", str(tmp_path / "hf"), str(tmp_path / "legacy"),
                             "--to", "megatron-legacy", "--tp", "2"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path / "legacy" / "release")) == ["mp_rank_00", "mp_rank_01"]
    info = subprocess.run([sys.executable, "-m", "pyconv", "inspect", str(tmp_path / "legacy"), "--json"],
                          capture_output=True, text=True)
    assert info.returncode == 0 and '"megatron-legacy"' in info.stdout, info.stderr


def test_megatron_core_checkpoints_stay_with_the_megatron_adapter(gpt2, tmp_path):
    gpt2.save_pretrained(tmp_path / "hf")
    pyconv.reshard(tmp_path / "hf", tmp_path / "mcore", to="megatron", tp=2)
    assert pyconv.open(tmp_path / "mcore").format == "megatron"
    pyconv.reshard(tmp_path / "hf", tmp_path / "legacy", to="megatron-legacy", tp=2)
    assert pyconv.open(tmp_path / "legacy").format == "megatron-legacy"


def test_legacy_read_does_not_import_torch(gpt2, tmp_path):
    src = save_legacy(legacy_rank_dicts(gpt2, "gpt2", 2, 2, 1.0), tmp_path / "legacy", "dir")
    code = ("import sys, pyconv; pyconv.reshard(sys.argv[1], sys.argv[2], to='hf'); "
            "pyconv.reshard(sys.argv[2], sys.argv[3], to='megatron-legacy', tp=2, pp=2); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code, src, str(tmp_path / "hf"), str(tmp_path / "again")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ---- hostile input ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpt2_rank_dicts(gpt2):
    return legacy_rank_dicts(gpt2, "gpt2", 2, 2, 3.0)


def _rank_file(src, t, p):
    return os.path.join(src, "release", f"mp_rank_{t:02d}_{p:03d}", "model_optim_rng.pt")


def test_truncated_rank_file_is_named(gpt2_rank_dicts, tmp_path):
    src = save_legacy(gpt2_rank_dicts, tmp_path / "legacy", "dir")
    victim = _rank_file(src, 1, 1)
    size = os.path.getsize(victim)
    with open(victim, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(FormatError, match=r"mp_rank_01_001/model_optim_rng\.pt: .*(truncated|corrupt)"):
        pyconv.open(src)


def test_missing_rank_is_named(gpt2_rank_dicts, tmp_path):
    src = save_legacy(gpt2_rank_dicts, tmp_path / "legacy", "dir")
    os.remove(_rank_file(src, 1, 0))
    os.rmdir(os.path.dirname(_rank_file(src, 1, 0)))
    with pytest.raises(FormatError, match=r"mp_rank_01_000 is missing \(found tp=2, pp=2\)"):
        pyconv.open(src)


def test_inconsistent_tp_shapes_are_named(gpt2_rank_dicts, tmp_path):
    dicts = dict(gpt2_rank_dicts)
    dicts[(1, 0)] = copy.deepcopy(gpt2_rank_dicts[(1, 0)])
    encoder = dicts[(1, 0)]["model"]["language_model"]["encoder"]
    encoder["layers.1.mlp.dense_h_to_4h.weight"] = encoder["layers.1.mlp.dense_h_to_4h.weight"][:40].clone()
    src = save_legacy(dicts, tmp_path / "legacy", "dir")
    with pytest.raises(FormatError, match=r"mp_rank_01_000/model_optim_rng\.pt: tensor "
                                          r"'model\.language_model\.encoder\.layers\.1\.mlp\.dense_h_to_4h\.weight' "
                                          r"has shape \[40, 48\], expected \[48, 48\] for tp=2"):
        pyconv.open(src)


def test_unknown_tensor_and_compressed_zip_are_refused(gpt2, tmp_path):
    dicts = legacy_rank_dicts(gpt2, "gpt2", 1, 1, 3.0)
    dicts[(0, 0)]["model"]["language_model"]["encoder"]["layers.0.self_attention.rotary.inv_freq"] = torch.ones(4)
    src = save_legacy(dicts, tmp_path / "unknown", "pt")
    with pytest.raises(FormatError, match=r"unknown\.pt: tensor 'model\.language_model\.encoder\.layers\.0\."
                                          r"self_attention\.rotary\.inv_freq' matches no legacy"):
        pyconv.open(src)
    staging = save_legacy(legacy_rank_dicts(gpt2, "gpt2", 1, 1, 3.0), tmp_path / "staging", "dir")
    deflated = tmp_path / "deflated.zip"
    with zipfile.ZipFile(deflated, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.write(os.path.join(staging, "release", "mp_rank_00", "model_optim_rng.pt"),
                "release/mp_rank_00/model_optim_rng.pt")
    with pytest.raises(FormatError, match=r"deflated\.zip: member 'release/mp_rank_00/model_optim_rng\.pt' is "
                                          r"compressed"):
        pyconv.open(deflated)


def test_truncated_member_inside_zip_is_named(gpt2, tmp_path):
    src = save_legacy(legacy_rank_dicts(gpt2, "gpt2", 1, 1, 3.0), tmp_path / "legacy", "zip")
    # Corrupt the inner archive's central directory: the member is there, its content is not a zip.
    with zipfile.ZipFile(src) as z:
        info = z.getinfo("release/mp_rank_00/model_optim_rng.pt")
    with open(src, "r+b") as f:
        f.seek(info.header_offset + 30 + len(info.filename) + info.file_size - 22)
        f.write(b"\0" * 22)  # the inner end-of-central-directory record
    with pytest.raises(FormatError, match=r"legacy\.zip!release/mp_rank_00/model_optim_rng\.pt: "):
        pyconv.open(src)


def test_bad_targets_are_refused(tmp_path):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    with pytest.raises(LayoutError, match="GPT-2 or BERT"):
        pyconv.reshard(tmp_path / "llama", tmp_path / "out", to="megatron-legacy")


def test_uneven_stages_round_trip_and_fp8_is_refused(gpt2, tmp_path):
    gpt2.save_pretrained(tmp_path / "hf")
    pyconv.reshard(tmp_path / "hf", tmp_path / "legacy", to="megatron-legacy", pp=3, first_stage_layers=2,
                   last_stage_layers=1)
    layers = [len(torch.load(tmp_path / "legacy" / "release" / f"mp_rank_00_{p:03d}" / "model_optim_rng.pt",
                             weights_only=False)["model"]["language_model"]["encoder"]) for p in range(3)]
    assert layers == [2 * 12, 1 * 12, 1 * 12 + 2]  # 12 tensors a layer; the final norm on the last stage
    pyconv.reshard(tmp_path / "legacy", tmp_path / "back", to="hf")
    back = _load_hf(transformers.GPT2LMHeadModel, tmp_path / "back")
    reference = gpt2.state_dict()
    assert all(torch.equal(t, reference[n]) for n, t in back.state_dict().items())
    with pytest.raises(LayoutError, match="not F8_E4M3"):
        pyconv.reshard(tmp_path / "hf", tmp_path / "fp8", to="megatron-legacy", dtype="fp8")


# ---- Megatron-Core judges the bert table ----------------------------------------------------

def test_megatron_core_bert_loads_converted_legacy_bert_with_equal_logits(bert, tmp_path):
    """legacy BERT (v1.0, tp 2) -> pyconv -> Megatron-Core names (local spec): Megatron-Core's own
    BertModel loads the rank file strictly and its logits equal transformers' on the source model."""
    harness = pytest.importorskip("megatron_harness")
    if not harness.megatron_available():
        pytest.skip("megatron-core is not installed")
    src = save_legacy(legacy_rank_dicts(bert, "bert", 2, 1, 1.0), tmp_path / "legacy", "dir")
    pyconv.reshard(src, tmp_path / "mcore", to="megatron", megatron_naming="local", vocab_divisible_by=DIVISIBLE_BY)
    assert pyconv.open(tmp_path / "mcore").architecture == "MegatronBertForPreTraining"
    state = torch.load(tmp_path / "mcore" / "release" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)
    g = torch.Generator().manual_seed(3)
    ids, types = torch.randint(0, VOCAB, (2, 11), generator=g), torch.randint(0, 2, (2, 11), generator=g)
    mask = torch.ones(2, 11, dtype=torch.long)
    with harness.megatron_parallel(1):
        from megatron.core.models.bert.bert_layer_specs import bert_layer_local_spec
        from megatron.core.models.bert.bert_model import BertModel
        from megatron.core.transformer.transformer_config import TransformerConfig

        config = TransformerConfig(
            num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, ffn_hidden_size=FFN,
            layernorm_epsilon=1e-5, hidden_dropout=0.0, attention_dropout=0.0, add_bias_linear=True,
            params_dtype=torch.float32, use_cpu_initialization=True, activation_func=torch.nn.functional.gelu,
            bias_activation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False,
            persist_layer_norm=False, gradient_accumulation_fusion=False)
        model = BertModel(config=config, num_tokentypes=2, transformer_layer_spec=bert_layer_local_spec,
                          vocab_size=state["args"].padded_vocab_size, max_sequence_length=POSITIONS,
                          add_binary_head=True, parallel_output=False,
                          share_embeddings_and_output_weights=True).eval()
        model.load_state_dict(state["model"], strict=True)
        with torch.no_grad():
            lm_logits, binary_logits = model(ids, mask, tokentype_ids=types)
    with torch.no_grad():
        reference = bert(input_ids=ids, token_type_ids=types, attention_mask=mask)
    torch.testing.assert_close(lm_logits[..., :VOCAB], reference.prediction_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(binary_logits, reference.seq_relationship_logits, rtol=1e-5, atol=1e-5)


def test_zip_with_iterations_follows_its_tracker(gpt2, tmp_path):
    """A .zip of a training directory: two iterations, the tracker names one; model_rng.pt (the
    distributed optimizer's name) is read like model_optim_rng.pt."""
    good = legacy_rank_dicts(gpt2, "gpt2", 1, 1, 3.0)
    stale = copy.deepcopy(good)
    stale[(0, 0)]["model"]["language_model"]["encoder"]["final_layernorm.bias"] += 1
    file = tmp_path / "run.zip"
    with zipfile.ZipFile(file, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("run/latest_checkpointed_iteration.txt", "200")
        for iteration, dicts in ((100, stale), (200, good)):
            torch.save(dicts[(0, 0)], tmp_path / "rank.pt")
            z.write(tmp_path / "rank.pt", f"run/iter_{iteration:07d}/mp_rank_00/model_rng.pt")
    ckpt = pyconv.open(file)
    assert ckpt.catalog.details["iteration"] == "iter_0000200"
    assert torch.equal(ckpt.get("transformer.ln_f.bias"), gpt2.state_dict()["transformer.ln_f.bias"])
    pyconv.reshard(file, tmp_path / "hf", to="hf")
    converted = _load_hf(transformers.GPT2LMHeadModel, tmp_path / "hf")
    assert torch.equal(_gpt2_logits(converted), _gpt2_logits(gpt2))


def test_config_json_in_the_directory_gives_the_true_vocab(gpt2, tmp_path):
    """Megatron-LM's own args carry only the padded vocab; a config.json beside the checkpoint
    says how many rows are real (Hugging Face's BERT converter takes it as --config_file)."""
    dicts = legacy_rank_dicts(gpt2, "gpt2", 2, 1, 3.0)
    del dicts[(0, 0)]["args"].orig_vocab_size  # one Namespace shared by the ranks
    src = save_legacy(dicts, tmp_path / "legacy", "dir")
    assert pyconv.open(src).shape("transformer.wte.weight") == (96, HIDDEN)  # the padded size, as HF's script
    gpt2.config.to_json_file(os.path.join(src, "config.json"))
    pyconv.reshard(src, tmp_path / "hf", to="hf")
    converted = _load_hf(transformers.GPT2LMHeadModel, tmp_path / "hf")
    assert torch.equal(_gpt2_logits(converted), _gpt2_logits(gpt2))


# ---- NeMo 1 (BERT-style and GPT-style key names) ---------------------------------------------

def nemo1_state_dicts(rank_dicts):
    """NeMo 1's model_weights.ckpt per rank: the LightningModule's flat state dict, every key under
    `model.`, the last stage's embedding copy under its attribute name `word_embeddings`."""
    out = {}
    for key, obj in rank_dicts.items():
        flat = {}
        for name, tensor in flatten_state_dict(obj["model"]).items():
            flat["model." + name.replace("word_embeddings_for_head.", "word_embeddings.")] = tensor
        out[key] = flat
    return out


def nemo1_model_config(family, tp, pp):
    config = {"num_layers": LAYERS, "hidden_size": HIDDEN, "ffn_hidden_size": FFN, "num_attention_heads": HEADS,
              "max_position_embeddings": POSITIONS, "encoder_seq_length": POSITIONS, "layernorm_epsilon": 1e-5,
              "make_vocab_size_divisible_by": DIVISIBLE_BY, "tensor_model_parallel_size": tp,
              "pipeline_model_parallel_size": pp, "normalization": "layernorm", "precision": 32,
              "tokenizer": {"library": "megatron",
                            "type": "BertWordPieceLowerCase" if family == "bert" else "GPT2BPETokenizer"}}
    if family == "bert":
        config.update(num_tokentypes=2, bert_binary_head=True, activation="gelu", bias_activation_fusion=False)
    else:
        config.update(activation="gelu", openai_gelu=True, position_embedding_type="learned_absolute")
    return config


def save_nemo1(state_dicts, config, path, container):
    import tarfile

    import yaml

    tp = max(t for t, _ in state_dicts) + 1
    pp = max(p for _, p in state_dicts) + 1
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "model_config.yaml"), "w") as f:
        yaml.safe_dump(config, f)
    for (t, p), flat in state_dicts.items():
        if tp == pp == 1:
            relative = "model_weights.ckpt"
        elif pp == 1:
            relative = f"mp_rank_{t:02d}/model_weights.ckpt"
        else:
            relative = f"tp_rank_{t:02d}_pp_rank_{p:03d}/model_weights.ckpt"
        os.makedirs(os.path.dirname(os.path.join(path, relative)), exist_ok=True)
        torch.save(flat, os.path.join(path, relative))
    if container == "dir":
        return str(path)
    file = f"{path}.nemo"
    with tarfile.open(file, "w:") as tar:  # as NeMo's save_to writes it
        tar.add(path, arcname=".")
    return file


@pytest.mark.parametrize("family, tp, pp, container", [
    ("bert", 2, 2, "dir"),
    ("bert", 2, 1, "nemo"),
    ("gpt2", 1, 2, "dir"),
    ("gpt2", 1, 1, "nemo"),
])
def test_nemo1_checkpoints_to_hf(gpt2, bert, tmp_path, family, tp, pp, container):
    model = gpt2 if family == "gpt2" else bert
    src = save_nemo1(nemo1_state_dicts(legacy_rank_dicts(model, family, tp, pp, 3.0)),
                     nemo1_model_config(family, tp, pp), tmp_path / "nemo1", container)
    ckpt = pyconv.open(src)
    assert ckpt.format == "megatron-legacy" and ckpt.catalog.details["container"] == (
        "nemo" if container == "nemo" else "nemo-directory")
    if container == "dir":  # the true vocabulary from the model's HF config beside the weights
        model.config.to_json_file(os.path.join(src, "config.json"))
    pyconv.reshard(src, tmp_path / "hf", to="hf")
    cls = transformers.GPT2LMHeadModel if family == "gpt2" else transformers.MegatronBertForPreTraining
    converted = _load_hf(cls, tmp_path / "hf")
    # Without a config.json NeMo 1 does not say the true vocabulary: the padded rows come along.
    assert converted.config.vocab_size == (VOCAB if container == "dir" else _padded(VOCAB, tp))
    ours = _gpt2_logits(converted) if family == "gpt2" else _bert_logits(converted)
    theirs = _gpt2_logits(model) if family == "gpt2" else _bert_logits(model)
    if family == "gpt2":
        assert torch.equal(ours[..., :VOCAB], theirs)
    else:
        assert torch.equal(ours[0][..., :VOCAB], theirs[0]) and torch.equal(ours[1], theirs[1])


def test_compressed_nemo_is_refused(tmp_path):
    import tarfile

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model_config.yaml").write_text("num_layers: 1\n")
    with tarfile.open(tmp_path / "m.nemo", "w:gz") as tar:
        tar.add(tmp_path / "m", arcname=".")
    with pytest.raises(FormatError, match=r"m\.nemo: a gzip-compressed \.nemo archive"):
        pyconv.open(tmp_path / "m.nemo")


def test_untied_output_layer_round_trips(tmp_path):
    torch.manual_seed(5)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=POSITIONS, n_embd=HIDDEN, n_layer=2, n_head=HEADS,
                                     tie_word_embeddings=False)
    model = _randomize_vectors(transformers.GPT2LMHeadModel(config).eval())
    model.save_pretrained(tmp_path / "hf")
    pyconv.reshard(tmp_path / "hf", tmp_path / "legacy", to="megatron-legacy", tp=2, pp=2,
                   vocab_divisible_by=DIVISIBLE_BY)
    last = torch.load(tmp_path / "legacy" / "release" / "mp_rank_01_001" / "model_optim_rng.pt", weights_only=False)
    assert last["args"].untie_embeddings_and_output_weights is True and "word_embeddings_for_head" not in last["model"]
    head = model.state_dict()["lm_head.weight"]
    assert torch.equal(last["model"]["language_model"]["output_layer"]["weight"][:VOCAB - 48], head[48:])
    pyconv.reshard(tmp_path / "legacy", tmp_path / "back", to="hf")
    back = _load_hf(transformers.GPT2LMHeadModel, tmp_path / "back")
    assert torch.equal(back.lm_head.weight, head) and not back.config.tie_word_embeddings
    assert torch.equal(_gpt2_logits(back), _gpt2_logits(model))


def test_argless_checkpoint_takes_the_config_json_beside_it(bert, tmp_path):
    """Old Megatron-LM saved no args (Hugging Face's BERT converter then wants --config_file)."""
    dicts = legacy_rank_dicts(bert, "bert", 1, 1, 1.0)
    del dicts[(0, 0)]["args"]
    (tmp_path / "ckpt").mkdir()
    src = save_legacy(dicts, tmp_path / "ckpt" / "bert_345m", "zip")
    with pytest.raises(FormatError, match=r"bert_345m\.zip!release/mp_rank_00/model_optim_rng\.pt: no 'args'"):
        pyconv.open(src)
    bert.config.to_json_file(tmp_path / "ckpt" / "config.json")
    pyconv.reshard(src, tmp_path / "hf", to="hf")
    converted = _load_hf(transformers.MegatronBertForPreTraining, tmp_path / "hf")
    for ours, theirs in zip(_bert_logits(converted), _bert_logits(bert)):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("version", [0, 1.0, 2.0, 3.0])
@pytest.mark.parametrize("heads, tp, hn, cols", [(4, 1, 3, 5), (4, 2, 2, 1), (6, 3, 4, 7), (8, 4, 1, 2)])
def test_qkv_position_maths_matches_the_reference_permutation(version, heads, tp, hn, cols):
    """Pure layout maths, no files: every (head, q/k/v, dim) row block of a rank's shard in
    [np, 3, hn] order is found where the version's order stored it (through the view the reader
    uses). cols 1 stands for a bias (stored 1-D)."""
    from pyconv.catalog import StoredTensor, view2d
    from pyconv.families import ModelDims
    from pyconv.formats.legacy_megatron import legacy_qkv_position

    dims = ModelDims(num_layers=1, hidden=heads * hn, heads=heads, groups=heads, head_dim=hn, ffn=4, vocab=8)
    np_local = heads // tp
    for rank in range(tp):
        parts = [(torch.arange(np_local * hn * cols) + 1000 * i).reshape(np_local, hn, cols) for i in range(3)]
        ordered = {0: torch.stack(parts), 1.0: torch.stack(parts, dim=2), 2.0: torch.stack(parts, dim=1),
                   3.0: torch.stack(parts, dim=1)}  # [3, np, hn], [np, hn, 3], [np, 3, hn] (x cols)
        stored = ordered[version].reshape(3 * np_local * hn, cols)
        canonical = ordered[3.0].reshape(3 * np_local * hn, cols)
        shape = (3 * np_local * hn,) if cols == 1 else (3 * np_local * hn, cols)
        for row0 in range(0, 3 * np_local * hn, hn):
            for d0, rows in ((0, hn), (hn - 1, 1)):
                view, r, c = legacy_qkv_position(StoredTensor("x", 0, "F32", shape), row0 + d0, rows, 0, dims, tp,
                                                 version)
                seen = stored.reshape(-1).as_strided(view.shape, view.element_strides, view.offset // 4)
                grid = seen.reshape(view2d(view.shape))
                assert torch.equal(grid[r:r + rows, c:c + cols], canonical[row0 + d0:row0 + d0 + rows]), \
                    (rank, row0, d0)


def test_args_as_simple_namespace_like_the_hf_gpt2_script(gpt2, tmp_path):
    """Hugging Face's Megatron-GPT2 script pickles its args as types.SimpleNamespace."""
    import types

    dicts = legacy_rank_dicts(gpt2, "gpt2", 2, 1, 3.0)
    simple = types.SimpleNamespace(**vars(dicts[(0, 0)]["args"]))
    for obj in dicts.values():
        obj["args"] = simple
    src = save_legacy(dicts, tmp_path / "legacy", "dir")
    assert pyconv.open(src).catalog.details["tp"] == 2
    pyconv.reshard(src, tmp_path / "hf", to="hf")
    converted = _load_hf(transformers.GPT2LMHeadModel, tmp_path / "hf")
    assert torch.equal(_gpt2_logits(converted), _gpt2_logits(gpt2))
