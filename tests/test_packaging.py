"""The build and the conversion path: no libtorch in the core, no torch import to convert."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pyconv
from pyconv import _core

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_core_does_not_link_libtorch():
    out = subprocess.run(["ldd", _core.__file__], capture_output=True, text=True, check=True).stdout
    assert out.strip()
    for lib in ("libtorch", "libc10", "libtorch_python", "libtorch_cpu"):
        assert lib not in out, out


def test_core_sources_do_not_include_torch_headers():
    for path in (ROOT / "csrc").rglob("*"):
        if not path.is_file():
            continue
        text = path.read_text()
        for marker in ("<torch/", "<ATen/", "<c10/", '"torch/'):
            assert marker not in text, f"{path.name} includes {marker}"


def run_cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "pyconv", *map(str, args)], capture_output=True, text=True, **kwargs)


def test_conversion_path_does_not_import_torch(tiny_models, tmp_path):
    _, src = tiny_models["llama"]
    code = (
        "import sys, pyconv.cli\n"
        f"rc = pyconv.cli.main(['reshard', {src!r}, {str(tmp_path / 'out')!r}, '--dtype', 'bf16', '--json'])\n"
        "rc2 = pyconv.cli.main(['inspect', " + repr(src) + "])\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', rc, rc2)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "NO-TORCH 0 0"


def test_cli_reshard_json_report(tiny_models, tmp_path):
    _, src = tiny_models["gpt2"]
    r = run_cli("reshard", src, tmp_path / "out", "--to", "hf", "--max-shard-size", "30KB", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["files"] == len(os.listdir(tmp_path / "out"))
    assert report["bytes"] == sum(p.stat().st_size for p in (tmp_path / "out").iterdir())
    assert report["gb_per_s"] > 0
    assert r.stderr == ""  # no progress bar when stderr is not a terminal


def test_cli_dry_run_prints_plan_and_writes_nothing(tiny_models, tmp_path):
    _, src = tiny_models["qwen2"]
    r = run_cli("reshard", src, tmp_path / "out", "--dtype", "fp16", "--max-shard-size", "30KB", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "model-00001-of-" in r.stdout and "total:" in r.stdout
    assert not (tmp_path / "out").exists()
    r = run_cli("reshard", src, tmp_path / "out", "--dtype", "fp16", "--max-shard-size", "30KB", "--dry-run", "--json")
    plan = json.loads(r.stdout)
    assert not (tmp_path / "out").exists()
    weights = [f for f in plan["files"] if f["kind"] == "weights"]
    assert len(weights) >= 2
    tensor = weights[0]["tensors"][0]
    assert tensor["dtype"] == "F16" and tensor["copies"][0]["src_dtype"] == "F32"
    assert plan["total_bytes"] == sum(f["size"] for f in plan["files"])


def test_cli_inspect(tiny_models):
    _, src = tiny_models["llama"]
    r = run_cli("inspect", src, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["format"] == "hf" and info["architecture"] == "LlamaForCausalLM"
    ckpt = pyconv.open(src)
    assert info["tensors"] == len(ckpt) and info["total_bytes"] == ckpt.total_bytes
    assert {t["name"] for t in info["tensor_list"]} == set(ckpt.keys())
    r = run_cli("inspect", src)
    assert "LlamaForCausalLM" in r.stdout and "tokenizer.json" in r.stdout


def test_demo_the_readme_runs(tmp_path):
    r = run_cli("demo", "--workdir", tmp_path / "demo")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().endswith("demo OK") and "bit for bit equal" in r.stdout
