"""The output-hash matrix: every family x every format it can be written in x a few layouts, with
and without --dtype, and back to HF from each; the sha256 of every output file must equal the
hashes recorded in tests/data/output_hashes.json (recorded before the adapters were redesigned).
A refused combination records the error class instead, so a target that starts or stops working
shows up too.

The sources are synthetic: tests/data/hash_matrix_sources.json holds each model's config.json and
its tensors' names, dtypes and shapes (as transformers' save_pretrained writes them); the bytes are
a fixed arithmetic pattern, so no random initialisation or library version enters the hashes.

    PYCONV_WRITE_HASHES=1 pytest tests/test_output_hashes.py    re-records the expected hashes
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

import pyconv
from pyconv.errors import PyconvError

DATA = Path(__file__).parent / "data"
SOURCES = json.loads((DATA / "hash_matrix_sources.json").read_text())
EXPECTED_FILE = DATA / "output_hashes.json"
WRITE = os.environ.get("PYCONV_WRITE_HASHES") == "1"
TOKENIZER = {"tokenizer.json": '{"version": "1.0"}\n', "tokenizer_config.json": '{"model_max_length": 64}\n'}

DENSE, MOE, MLA = "dense", "moe", "mla"
KIND = {"llama": DENSE, "llama_bf16": DENSE, "llama_bias": DENSE, "mistral": DENSE, "qwen2": DENSE,
        "qwen3": DENSE, "qwen3_moe": MOE, "mixtral": MOE, "qwen2_moe": MOE, "deepseek_v3": MLA,
        "deepseek_v3_no_q_lora": MLA, "deepseek_v2": MLA, "deepseek_v3_mtp": MLA, "deepseek_v3_fp8": MLA,
        "gpt2": DENSE, "bert": DENSE, "seed_oss": DENSE, "phi3": DENSE, "smollm3": DENSE,
        "gemma2": DENSE, "gemma3": DENSE, "olmo2": DENSE, "glm4_moe": MOE,
        "olmoe": MOE, "deepseek_v32": MLA}

# (case id, target format, options); each output is also read back to HF (case id + ">hf").
COMMON_TARGETS = [
    ("hf", "hf", {}),
    ("hf-bf16-shards", "hf", {"dtype": "bf16", "max_shard_size": "20KB"}),
    ("hf-fp8", "hf", {"dtype": "fp8"}),
    ("megatron", "megatron", {}),
    ("megatron-tp2-pp2-bf16", "megatron", {"tp": 2, "pp": 2, "dtype": "bf16"}),
    ("megatron-tp4-local", "megatron", {"tp": 4, "megatron_naming": "local"}),
    ("megatron-pp2-vpp2-iter", "megatron", {"pp": 2, "vpp": 2, "iteration": 7}),
    ("megatron-pp2-first1", "megatron", {"pp": 2, "first_stage_layers": 1}),
    ("megatron-layout", "megatron", {"pp": 2, "pipeline_layout": "Et|tttL"}),
    ("torch_dist", "torch_dist", {}),
    ("torch_dist-tp2-fp16", "torch_dist", {"tp": 2, "dtype": "fp16"}),
    ("nemo", "nemo", {}),
    ("nemo-bf16", "nemo", {"dtype": "bf16"}),
    ("deepseek", "deepseek", {}),
    ("deepseek-tp2", "deepseek", {"tp": 2}),
    ("megatron-legacy-tp2-pp2", "megatron-legacy", {"tp": 2, "pp": 2}),
    ("mindspore", "mindspore", {}),
    ("mindspore-bf16", "mindspore", {"dtype": "bf16"}),
]
MOE_TARGETS = [
    ("megatron-ep2", "megatron", {"ep": 2}),
    ("megatron-tp2-ep2-etp1", "megatron", {"tp": 2, "ep": 2, "etp": 1, "megatron_naming": "local"}),
    ("megatron-ep4-grouped", "megatron", {"ep": 4, "moe_grouped_gemm": True}),
    ("megatron-tp2-ep2-bf16", "megatron", {"tp": 2, "ep": 2, "dtype": "bf16"}),
]
# Megatron -> Megatron and torch_dist -> Megatron in one pass (source case, target, options).
RESHARDS = [
    ("megatron-tp2-pp2-bf16", "megatron", {"tp": 1, "pp": 1}),
    ("megatron-tp2-pp2-bf16", "torch_dist", {}),
    ("torch_dist", "megatron", {"tp": 2, "pp": 2}),
]
LAYOUT_FOR_3_LAYERS = {"megatron-layout": {"pp": 2, "pipeline_layout": "Et|ttL"},
                       "megatron-pp2-vpp2-iter": {"pp": 3, "iteration": 7},
                       "megatron-tp2-pp2-bf16": {"tp": 2, "pp": 3, "dtype": "bf16"}}


def _pattern(count: int, seed: int) -> np.ndarray:
    """count float32 values in [-0.5, 0.5), a fixed function of (index, seed)."""
    i = np.arange(count, dtype=np.int64)
    return (((i * 7919 + seed * 104729) % 4093) - 2046).astype(np.float32) / 4096.0


def _tensor_bytes(dtype: str, shape: list[int], seed: int) -> bytes:
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    values = _pattern(count, seed)
    if dtype == "F32":
        return values.astype("<f4").tobytes()
    if dtype == "BF16":
        return (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    if dtype == "F8_E4M3":  # every finite e4m3fn code but the NaNs (0x7f, 0xff)
        i = np.arange(count, dtype=np.int64)
        return (((i * 37 + seed) % 0x7F) | ((i & 1) << 7)).astype(np.uint8).tobytes()
    raise ValueError(dtype)


def _write_safetensors(path: Path, tensors: list[tuple[str, str, list[int], bytes]]) -> None:
    header, offset = {}, 0
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for *_, data in tensors:
            f.write(data)


def _fp8_source() -> dict:
    """DeepSeek-V3 with its layers' linear weights in fp8 e4m3 and 128x128 weight_scale_inv grids."""
    base = SOURCES["deepseek_v3"]
    tensors = []
    for name, dtype, shape, *rest in base["tensors"]:
        linear = (name.startswith("model.layers.") and name.endswith("proj.weight") and len(shape) == 2)
        if linear:
            tensors.append([name, "F8_E4M3", shape])
            tensors.append([name + "_scale_inv", "F32", [-(-shape[0] // 128), -(-shape[1] // 128)]])
        else:
            tensors.append([name, dtype, shape, *rest])
    config = {**base["config"], "quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                                                         "weight_block_size": [128, 128],
                                                         "activation_scheme": "dynamic"}}
    return {"config": config, "tensors": tensors}


def _bf16_source(name: str) -> dict:
    base = SOURCES[name]
    return {"config": {**base["config"], "dtype": "bfloat16"},
            "tensors": [[n, "BF16", s, *rest] for n, _, s, *rest in base["tensors"]]}


def _source(name: str) -> dict:
    if name == "deepseek_v3_fp8":
        return _fp8_source()
    if name == "llama_bf16":
        return _bf16_source("llama")
    return SOURCES[name]


def make_source(name: str, root: Path) -> Path:
    spec = _source(name)
    out = root / name
    out.mkdir(parents=True)
    by_name, tensors = {}, []
    for seed, (tensor, dtype, shape, *copy_of) in enumerate(spec["tensors"]):
        data = by_name[copy_of[0]] if copy_of else _tensor_bytes(dtype, shape, seed)
        if dtype == "F32" and tensor.endswith("_scale_inv"):  # positive scales
            data = (np.abs(np.frombuffer(data, "<f4")) + np.float32(0.25)).astype("<f4").tobytes()
        by_name[tensor] = data
        tensors.append((tensor, dtype, shape, data))
    _write_safetensors(out / "model.safetensors", tensors)
    (out / "config.json").write_text(json.dumps(spec["config"], indent=2, sort_keys=True) + "\n")
    for file, text in TOKENIZER.items():
        (out / file).write_text(text)
    return out


def tree_hashes(path: Path) -> dict[str, str]:
    out = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        out[str(file.relative_to(path))] = hashlib.sha256(file.read_bytes()).hexdigest()[:16]
    return out


def _convert(src: Path, dst: Path, to: str, options: dict):
    try:
        pyconv.reshard(src, dst, to=to, threads=2, **options)
    except PyconvError as e:
        return f"refused: {type(e).__name__}"
    except Exception as e:  # a crash is recorded too, so that fixing it shows in the matrix
        return f"crash: {type(e).__name__}"
    return tree_hashes(dst)


def source_cases(name: str) -> list[tuple[str, str, dict]]:
    cases = list(COMMON_TARGETS) + (MOE_TARGETS if KIND[name] in (MOE, MLA) else [])
    layers = _source(name)["config"].get("num_hidden_layers", _source(name)["config"].get("n_layer"))
    if layers == 3:
        cases = [(cid, to, LAYOUT_FOR_3_LAYERS.get(cid, opts)) for cid, to, opts in cases]
    return cases


def run_matrix(name: str, root: Path) -> dict:
    src = make_source(name, root / "src")
    layers = _source(name)["config"].get("num_hidden_layers", _source(name)["config"].get("n_layer"))
    results = {"source": tree_hashes(src)}
    for case, to, options in source_cases(name):
        dst = root / case
        results[case] = _convert(src, dst, to, options)
        if isinstance(results[case], dict):
            results[case + ">hf"] = _convert(dst, root / (case + ">hf"), "hf", {})
    for case, to, options in RESHARDS:
        if layers == 3 and options.get("pp") == 2:
            options = {**options, "pp": 3}
        if isinstance(results.get(case), dict):
            key = f"{case}>{to}" + "".join(f"-{k}{v}" for k, v in options.items())
            results[key] = _convert(root / case, root / key, to, options)
    return results


SOURCE_NAMES = sorted(KIND)


@pytest.mark.parametrize("name", SOURCE_NAMES)
def test_output_hashes(name, tmp_path):
    results = run_matrix(name, tmp_path)
    if WRITE:
        recorded = json.loads(EXPECTED_FILE.read_text()) if EXPECTED_FILE.exists() else {}
        recorded[name] = results
        EXPECTED_FILE.write_text(json.dumps(dict(sorted(recorded.items())), indent=1, sort_keys=True) + "\n")
        return
    expected = json.loads(EXPECTED_FILE.read_text())[name]
    assert set(results) == set(expected), f"cases changed: {sorted(set(results) ^ set(expected))}"
    differing = [case for case in expected if results[case] != expected[case]]
    assert not differing, "outputs changed: " + "; ".join(
        f"{case}: {_difference(expected[case], results[case])}" for case in differing)


def _difference(expected, got) -> str:
    if not isinstance(expected, dict) or not isinstance(got, dict):
        return f"expected {expected if isinstance(expected, str) else 'files'}, got {got if isinstance(got, str) else 'files'}"
    files = sorted(set(expected) | set(got))
    return ", ".join(f for f in files if expected.get(f) != got.get(f))


def test_matrix_covers_every_family_and_writable_format():
    """Every family pyconv registers has a source here, and every writable format is a target."""
    from pyconv.families import _FAMILIES, family_names
    from pyconv.formats import format_names, get_format

    family_names()
    covered = {pyconv_family(name) for name in SOURCE_NAMES}
    assert covered == set(_FAMILIES)
    targets = {to for _, to, _ in COMMON_TARGETS + MOE_TARGETS}
    assert targets == {f for f in format_names() if get_format(f).plan_output is not None}


def pyconv_family(source: str) -> str:
    from pyconv.families import family_for_architecture

    return family_for_architecture(_source(source)["config"]["architectures"][0], source).name
