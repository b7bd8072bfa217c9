"""pyconv's Triton kernels live in the repository's top-level kernels/ but install as
pyconv._kernels (pyproject.toml: wheel.force-include), never as a top-level `kernels`: that
name is Hugging Face's distribution (hub kernels for transformers), which the test extra installs
beside pyconv. Both must import in one process, each from its own distribution, whichever first."""

from __future__ import annotations

import importlib.metadata as md
import json
import subprocess
import sys
from pathlib import Path

import pytest

# Run in a fresh interpreter: importing the kernels imports triton, which must not happen in
# the pytest process before the other kernel tests set TRITON_INTERPRET.
BOTH_IMPORTED = r"""
import importlib, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
hf, ours = sys.modules["kernels"], sys.modules["pyconv._kernels"]
print(json.dumps({"hf_file": hf.__file__, "hf_has_get_kernel": callable(getattr(hf, "get_kernel", None)),
                  "ours_file": ours.__file__, "ops_file": sys.modules["pyconv._kernels.ops"].__file__,
                  "same_module": hf is ours, "launch_cast": hasattr(ours.ops, "launch_cast")}))
"""


def files_of(dist: str) -> list[md.PackagePath]:
    files = md.files(dist)
    assert files is not None, f"{dist} has no RECORD"
    return files


def is_editable(dist: str) -> bool:
    direct_url = md.distribution(dist).read_text("direct_url.json")
    return bool(direct_url) and json.loads(direct_url).get("dir_info", {}).get("editable", False)


@pytest.mark.parametrize("order", [("kernels", "pyconv._kernels.ops"), ("pyconv._kernels.ops", "kernels")],
                         ids=["hf-first", "pyconv-first"])
def test_hf_kernels_and_pyconv_kernels_import_side_by_side(order):
    r = subprocess.run([sys.executable, "-c", BOTH_IMPORTED, *order], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert not got["same_module"]
    assert got["hf_has_get_kernel"], got
    assert got["launch_cast"], got
    # `import kernels` is the file Hugging Face's distribution installed, not pyconv's folder.
    hf_dist = md.distribution("kernels")
    assert Path(got["hf_file"]).resolve() in {Path(hf_dist.locate_file(f)).resolve() for f in files_of("kernels")}
    assert Path(got["ops_file"]).name == "ops.py" and Path(got["ops_file"]).parent == Path(got["ours_file"]).parent


def test_pyconv_installs_no_top_level_kernels():
    pyconv_files = files_of("pyconv")
    assert not [str(f) for f in pyconv_files if f.parts[0] == "kernels"]
    assert md.packages_distributions().get("kernels") == ["kernels"]  # Hugging Face's alone
    if not is_editable("pyconv"):  # an editable install records only its redirect finder
        installed = {str(f) for f in pyconv_files}
        assert {"pyconv/_kernels/__init__.py", "pyconv/_kernels/ops.py"} <= installed, sorted(installed)
