"""A command line that explains itself: --version, bare `pyconv` shows the commands, every
subcommand's --help describes each argument with real examples, one error prefix, the same
tensor count in the reshard report as in `inspect`, a progress bar with bytes and phases that
fits a narrow terminal, and a demo that leaves nothing behind."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import tempfile
import termios

import pytest

import pyconv
from pyconv.cli import _build_parser


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "pyconv", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def test_version():
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"pyconv {pyconv.__version__}"


def test_bare_pyconv_prints_usage_and_the_commands():
    r = run_cli()
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("usage: pyconv")
    for command in ("inspect", "reshard", "verify", "demo"):
        assert re.search(rf"^\s+{command}\s+\S", r.stderr, re.M), command


def _subcommands():
    parser = _build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices


@pytest.mark.parametrize("command", ["inspect", "reshard", "verify", "demo"])
def test_every_argument_is_described_and_examples_are_real(command, tiny_models, tmp_path):
    sub = _subcommands()[command]
    assert sub.description
    for action in sub._actions:
        assert action.help, f"{command}: {action.dest} has no help"
    r = run_cli(command, "--help")
    assert r.returncode == 0 and "examples:" in r.stdout
    examples = [line.split("#")[0].split() for line in r.stdout.split("examples:")[1].splitlines() if line.strip()]
    assert 2 <= len(examples) <= 5 and all(e[:2] == ["pyconv", command] for e in examples)
    # Each example parses: its options exist and take the values shown.
    for example in examples:
        _build_parser().parse_args(example[1:])


@pytest.mark.parametrize("args", [("reshard",), ("reshard", "a", "b", "--to", "nowhere"), ("frobnicate",),
                                  ("inspect", "/no/such/path"), ("verify", "a")])
def test_one_error_prefix(args):
    r = run_cli(*args)
    assert r.returncode == 2 and r.stderr.startswith("pyconv: error: ") and r.stderr.count("\n") == 1, r.stderr


@pytest.mark.parametrize("to, options", [("megatron", {"tp": 2, "pp": 2}), ("hf", {"dtype": "fp8"}),
                                         ("torch_dist", {}), ("megatron-legacy", {"tp": 2}),
                                         ("mindspore", {}), ("nemo", {})])
def test_the_report_counts_tensors_as_inspect_does(tiny_models, tmp_path, to, options):
    family = "gpt2" if to == "megatron-legacy" else "llama"
    src = tiny_models[family][1]
    report = pyconv.reshard(src, tmp_path / "out", to=to, **options)
    assert report.tensors == len(pyconv.open(tmp_path / "out"))
    assert report.to_json()["stored_tensors"] == report.plan.tensor_count
    r = run_cli("inspect", tmp_path / "out", "--json")
    assert json.loads(r.stdout)["tensors"] == report.tensors


def test_the_report_counts_what_a_conversion_drops(tmp_path):
    """DeepSeek's layout drops the multi-token-prediction layer; the count is the output's."""
    from test_output_hashes import make_source

    src = make_source("deepseek_v3_mtp", tmp_path / "src")
    report = pyconv.reshard(src, tmp_path / "ds", to="deepseek", tp=2)
    assert report.tensors == len(pyconv.open(tmp_path / "ds")) < len(pyconv.open(src))


def _run_in_terminal(argv, columns):
    pid, fd = pty.fork()
    if pid == 0:  # the child: the CLI on a terminal `columns` wide
        os.environ["COLUMNS"] = str(columns)
        os.execv(sys.executable, [sys.executable, "-m", "pyconv", *argv])
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    out = b""
    while True:
        ready, _, _ = select.select([fd], [], [], 120)
        if not ready:
            break
        try:
            data = os.read(fd, 65536)
        except OSError:
            break
        if not data:
            break
        out += data
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out.decode("utf-8", "replace")


@pytest.mark.parametrize("columns", [30, 120])
def test_progress_bar_shows_bytes_and_phases_and_fits(tiny_models, tmp_path, columns):
    code, out = _run_in_terminal(["reshard", tiny_models["llama"][1], str(tmp_path / "out"), "--to", "megatron",
                                  "--tp", "2"], columns)
    assert code == 0, out
    frames = [f for f in re.split(r"[\r\n]", out) if f.strip()]
    bar_frames = [f for f in frames if "%|" in f]
    assert {f.split(":")[0] for f in bar_frames} >= {"copying", "syncing", "committing"}, bar_frames
    assert any("MB/" in f or "kB/" in f for f in bar_frames)
    assert all(len(f) <= columns for f in bar_frames), [f for f in bar_frames if len(f) > columns]
    assert frames[-1].startswith(f"wrote {tmp_path / 'out'}")


def test_api_errors_name_no_command_line_flags(tiny_models, tmp_path):
    from pyconv.errors import PyconvError

    src = tiny_models["llama"][1]
    pyconv.reshard(src, tmp_path / "out", to="hf")
    messages = []
    for call in (lambda: pyconv.reshard(src, tmp_path / "out", to="hf"),
                 lambda: pyconv.reshard(src, tmp_path / "x", to="hf", tp=2),
                 lambda: pyconv.reshard(src, tmp_path / "x", to="megatron", threads=0),
                 lambda: pyconv.reshard(src, tmp_path / "x", to="megatron", dtype="fp8")):
        with pytest.raises(PyconvError) as e:
            call()
        messages.append(str(e.value))
    assert not [m for m in messages if re.search(r"(^|\s|\()--[a-z]", m)], messages


def test_demo_prints_each_step_once_and_leaves_nothing(tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    r = run_cli("demo", env=dict(os.environ, TMPDIR=str(scratch)))
    assert r.returncode == 0, r.stderr
    steps = re.findall(r"^(\d+)\. ", r.stdout, re.M)
    assert steps == [str(i) for i in range(1, len(steps) + 1)] and len(steps) >= 4
    assert r.stdout.strip().endswith("demo OK")
    assert "%|" not in r.stdout + r.stderr and "it/s" not in r.stderr  # no other library's progress bar
    assert os.listdir(scratch) == [] and tempfile.gettempdir() != str(scratch)
