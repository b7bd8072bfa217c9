"""The C++ core under AddressSanitizer + UndefinedBehaviorSanitizer, without Python.

Builds the plain C++ driver csrc/tests/core_tests.cpp (CMake option PYCONV_BUILD_TESTS) with
PYCONV_SANITIZE=ON in a Debug build, then runs it over the hostile corpus (tests/data/hostile) and
the fuzz regression corpus (tests/data/fuzz), once per cast instruction-set variant. The driver
checks the safetensors prefix/offset-table validation, execute_plan (valid and hostile plans) and
exhaustive cast round trips; the test asserts exit 0 and no sanitizer report in its output.

By hand:
    cmake -S . -B build-asan -G Ninja -DPYCONV_SANITIZE=ON -DPYCONV_BUILD_TESTS=ON -DCMAKE_BUILD_TYPE=Debug
    ninja -C build-asan core_tests
    ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \\
        build-asan/core_tests tests/data/hostile tests/data/fuzz
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPORA = [os.path.join(ROOT, "tests", "data", "hostile"), os.path.join(ROOT, "tests", "data", "fuzz")]
SANITIZER_MARKERS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:", "SUMMARY: AddressSanitizer",
                     "SUMMARY: UndefinedBehaviorSanitizer", "ThreadSanitizer", "==ERROR==")


def _tool(name: str) -> str | None:
    # The venv's cmake/ninja first (pip-installed next to this interpreter), then PATH.
    here = os.path.join(os.path.dirname(sys.executable), name)
    return here if os.access(here, os.X_OK) else shutil.which(name)


def _compiler() -> str | None:
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx)
    for name in ("c++", "g++", "clang++"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _sanitizers_link(cxx: str, tmp: str) -> bool:
    """Whether cxx can build and run a program with -fsanitize=address,undefined."""
    src = os.path.join(tmp, "probe.cpp")
    exe = os.path.join(tmp, "probe")
    with open(src, "w") as f:
        f.write("#include <vector>\nint main() { std::vector<int> v(3); return v[1]; }\n")
    try:
        r = subprocess.run([cxx, "-fsanitize=address,undefined", src, "-o", exe], capture_output=True, timeout=60)
        return r.returncode == 0 and subprocess.run([exe], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def core_tests_exe(tmp_path_factory) -> str:
    cmake, ninja, cxx = _tool("cmake"), _tool("ninja"), _compiler()
    if cmake is None:
        pytest.skip("cmake is not installed: cannot build the sanitized core_tests driver")
    if ninja is None:
        pytest.skip("ninja is not installed: cannot build the sanitized core_tests driver")
    if cxx is None:
        pytest.skip("no C++ compiler (c++, g++, clang++ or $CXX) found: cannot build core_tests")
    build = str(tmp_path_factory.mktemp("core_tests_asan"))
    if not _sanitizers_link(cxx, build):
        pytest.skip(f"{cxx} cannot build and run programs with -fsanitize=address,undefined (no libasan/libubsan?)")
    env = dict(os.environ, CXX=cxx)
    configure = subprocess.run(
        [cmake, "-S", ROOT, "-B", build, "-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}", "-DPYCONV_SANITIZE=ON",
         "-DPYCONV_BUILD_TESTS=ON", "-DCMAKE_BUILD_TYPE=Debug",
         f"-DPython_EXECUTABLE={sys.executable}"],  # whose site-packages hold yyjson.c (pyproject's test extra)
        capture_output=True, text=True, env=env, timeout=120)
    assert configure.returncode == 0, f"cmake configure failed:\n{configure.stdout}\n{configure.stderr}"
    built = subprocess.run([cmake, "--build", build, "--target", "core_tests"], capture_output=True, text=True,
                           env=env, timeout=300)
    assert built.returncode == 0, f"building core_tests failed:\n{built.stdout[-8000:]}\n{built.stderr[-8000:]}"
    exe = os.path.join(build, "core_tests")
    assert os.access(exe, os.X_OK), f"{exe} was not built"
    return exe


@pytest.mark.parametrize("isa", ["", "avx2", "portable"])
def test_core_under_sanitizers(core_tests_exe, isa):
    env = dict(os.environ,
               ASAN_OPTIONS="detect_leaks=1:abort_on_error=1",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1")
    env.pop("PYCONV_CAST_ISA", None)
    if isa:
        env["PYCONV_CAST_ISA"] = isa
    corpora = [c for c in CORPORA if os.path.isdir(c)]
    r = subprocess.run([core_tests_exe, *corpora], capture_output=True, text=True, env=env, timeout=300)
    output = r.stdout + r.stderr
    reports = [m for m in SANITIZER_MARKERS if m in output]
    assert not reports, f"sanitizer report ({', '.join(reports)}):\n{output[-12000:]}"
    assert r.returncode == 0, f"core_tests exited {r.returncode}:\n{output[-12000:]}"
    assert "core_tests: OK" in r.stdout, output[-4000:]
