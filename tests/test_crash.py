"""Crash safety and hostile destinations.

A conversion killed at any moment (SIGKILL) leaves either no destination or a complete one,
beside at most clearly named temporaries `.NAME.pyconv-tmp-PID`; a rerun cleans those up.
SIGINT and SIGTERM stop the run cleanly (exit 130, one line on stderr, no temporary left).
A full disk or a read-only destination fails with exit 2 and one line naming the destination.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

import pyconv

MIB = 1 << 20
# Many small tensors: the conversion's cost is mostly per tensor (reading headers, planning, one
# block copy each), so seconds of work need far less data than 2-3 GiB of large tensors would
# (hashing and the page cache stay cheap). The fixture grows the source until a full run takes
# MIN_RUN_SECONDS here: 32768 tensors of 16 KiB (512 MiB) took 3-4 s on a 2-core VM.
TENSOR_ROWS, TENSOR_COLS = 4, 1024
FIRST_TENSOR_COUNT = 32768
MIN_RUN_SECONDS = 3.0
TENSORS_PER_FILE = 8192
KILLS = 20
SEED = 20261122


# --- a synthetic fp32 HF checkpoint, written directly -------------------------------------------

def _write_safetensors(path, tensors):
    """tensors: [(name, float32 array)]: 8-byte little-endian header length, JSON header, data."""
    header, offset = {}, 0
    for name, arr in tensors:
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, arr in tensors:
            f.write(arr.tobytes())


def build_source(root, count, tensors_per_file=TENSORS_PER_FILE, seed=0):
    """count fp32 tensors of TENSOR_ROWS x TENSOR_COLS, tensors_per_file to a shard, an index, a config."""
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    tensor_bytes = TENSOR_ROWS * TENSOR_COLS * 4
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal((64, TENSOR_ROWS, TENSOR_COLS), dtype=np.float32)
    files = (count + tensors_per_file - 1) // tensors_per_file
    weight_map = {}
    for fi in range(files):
        fname = f"model-{fi + 1:05d}-of-{files:05d}.safetensors"
        tensors = []
        for i in range(fi * tensors_per_file, min(count, (fi + 1) * tensors_per_file)):
            name = f"model.layers.{i}.mlp.weight"
            tensors.append((name, pool[i % len(pool)] * np.float32(1 + (i % 97) / 64)))
            weight_map[name] = fname
        _write_safetensors(os.path.join(root, fname), tensors)
    with open(os.path.join(root, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": count * tensor_bytes}, "weight_map": weight_map}, f)
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float32"}, f)
    return str(root)


# --- fingerprints ---------------------------------------------------------------------------------

def quick_fingerprint(path):
    """size, mtime_ns and sha256 of the first and last MiB of every file: cheap, catches any rewrite."""
    out = {}
    for name in sorted(os.listdir(path)):
        p = os.path.join(path, name)
        st = os.stat(p)
        h = hashlib.sha256()
        with open(p, "rb") as f:
            h.update(f.read(MIB))
            if st.st_size > MIB:
                f.seek(max(MIB, st.st_size - MIB))
                h.update(f.read())
        out[name] = (st.st_size, st.st_mtime_ns, h.hexdigest())
    return out


def full_digest(path):
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            p = os.path.join(root, name)
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(16 * MIB), b""):
                    h.update(block)
            out[os.path.relpath(p, path)] = h.hexdigest()
    return out


def reshard_cmd(src, dst, *extra):
    return [sys.executable, "-m", "pyconv", "reshard", str(src), str(dst), "--to", "hf", "--dtype", "bf16",
            "--threads", "1", *extra]


def siblings(dst):
    """Everything beside dst in its (otherwise empty) parent, dst itself excluded."""
    parent, name = os.path.split(str(dst))
    return sorted(e for e in os.listdir(parent) if e != name)


def tmp_pattern(dst):
    return re.compile(rf"^\.{re.escape(os.path.basename(str(dst)))}\.pyconv-tmp-(\d+)$")


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """The source, the source's fingerprints, and a reference conversion (timed, hashed)."""
    root = tmp_path_factory.mktemp("crash")
    ref = root / "ref"
    count = FIRST_TENSOR_COUNT
    for _ in range(3):
        src = build_source(root / "src", count)
        shutil.rmtree(ref, ignore_errors=True)
        started = time.perf_counter()
        done = subprocess.run(reshard_cmd(src, ref), cwd=root, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        assert done.returncode == 0, done.stderr
        print(f"\nsource {count} tensors, {count * TENSOR_ROWS * TENSOR_COLS * 4 / 2**30:.2f} GiB: "
              f"a full conversion (subprocess, --threads 1) took {seconds:.2f} s")
        if seconds >= MIN_RUN_SECONDS:
            break
        count = min(int(count * (MIN_RUN_SECONDS * 1.15) / seconds) + 1, 16 * FIRST_TENSOR_COUNT)
    fingerprint = quick_fingerprint(src)
    digest = full_digest(src)
    return {"root": root, "src": src, "fingerprint": fingerprint, "digest": digest, "ref": str(ref),
            "ref_digest": full_digest(ref), "seconds": seconds}


# --- SIGKILL at random moments --------------------------------------------------------------------

def test_sigkill_at_random_moments_leaves_no_complete_looking_destination(big, tmp_path):
    src, seconds = big["src"], big["seconds"]
    work = tmp_path / "work"
    work.mkdir()
    dst = work / "out"
    pattern = tmp_pattern(dst)
    rng = random.Random(SEED)
    before_copy = during_copy = after_commit = finished = 0
    while before_copy + during_copy + after_commit < KILLS:
        i = before_copy + during_copy + after_commit
        delay = rng.uniform(0.0, seconds * 1.1)
        started = time.monotonic()
        proc = subprocess.Popen(reshard_cmd(src, dst), cwd=tmp_path, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        while time.monotonic() - started < delay and proc.poll() is None:
            time.sleep(0.002)
        if proc.poll() is not None:  # it finished first: the machine got faster; aim at the real run time
            assert proc.returncode == 0
            seconds = time.monotonic() - started
            finished += 1
            assert finished <= KILLS, "the conversion keeps finishing before it can be killed"
            assert siblings(dst) == [] and full_digest(dst) == big["ref_digest"]
            shutil.rmtree(dst)
            continue
        proc.kill()
        proc.wait()
        own_temporary = (work / f".out.pyconv-tmp-{proc.pid}").exists()
        for entry in siblings(dst):
            m = pattern.match(entry)
            assert m, f"kill {i} (after {delay:.2f} s): unexpected {entry!r} beside the destination"
            assert not _alive(int(m.group(1)))
        if dst.exists():
            # The kill came after the final rename: the destination must be the complete output.
            after_commit += 1
            assert not own_temporary
            assert full_digest(dst) == big["ref_digest"], f"kill {i} after {delay:.2f} s: incomplete destination"
            shutil.rmtree(dst)
        elif own_temporary:
            during_copy += 1
        else:
            before_copy += 1
    before_commit = before_copy + during_copy
    print(f"\n{KILLS} kills: {before_commit} before the commit ({before_copy} before the temporary existed, "
          f"{during_copy} while writing it), {after_commit} after the commit; "
          f"{finished} run(s) finished before their kill")
    assert before_commit >= KILLS // 2

    # A rerun with --force succeeds and removes the temporaries the killed runs left.
    done = subprocess.run(reshard_cmd(src, dst, "--force"), cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert siblings(dst) == []
    report = pyconv.verify(src, str(dst), atol=1e-2, rtol=1e-2)
    assert report.equal, report.summary()
    assert quick_fingerprint(src) == big["fingerprint"]
    assert full_digest(src) == big["digest"]


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_kill_with_force_over_an_old_destination_keeps_it(big, tmp_path):
    """Killed mid-run with --force over an existing destination: the old one stays, whole."""
    src = big["src"]
    dst = tmp_path / "work" / "out"
    dst.parent.mkdir()
    dst.mkdir()
    (dst / "marker.txt").write_text("old")
    proc = subprocess.Popen(reshard_cmd(src, dst, "--force"), cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _wait_for_temporary(dst, proc)
    time.sleep(0.3)
    proc.kill()
    proc.wait()
    assert os.listdir(dst) == ["marker.txt"] and (dst / "marker.txt").read_text() == "old"
    assert all(tmp_pattern(dst).match(e) for e in siblings(dst)), siblings(dst)


def _wait_for_temporary(dst, proc, timeout=30.0):
    pattern = tmp_pattern(dst)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(pattern.match(e) for e in siblings(dst)):
            return
        assert proc.poll() is None, "the conversion ended before its temporary appeared"
        time.sleep(0.01)
    raise AssertionError("no temporary appeared")


# --- SIGINT / SIGTERM -----------------------------------------------------------------------------

def _stopped(returncode: int, sig) -> bool:
    """Exit 130; or, after a SIGINT, death by SIGINT: CPython sometimes ends a run whose
    KeyboardInterrupt pyconv caught and reported by re-raising SIGINT on itself at exit
    (strace: kill(self, SIGINT) after pyconv's one line; seen about one run in ten when the
    signal lands at start-up), which shells read as Ctrl-C too."""
    return returncode == 130 or (sig == signal.SIGINT and returncode == -signal.SIGINT)


def _sigint_as_a_terminal_sends_it():
    """A shell's background job starts with SIGINT ignored, and Python then leaves it ignored
    (as it should: nohup). The child gets the disposition an interactive Ctrl-C meets."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_signallable(src, tmp_path):
    """(conversion process, its destination) for a run that is about to be signalled."""
    dst = tmp_path / "work" / "out"
    dst.parent.mkdir()
    proc = subprocess.Popen(reshard_cmd(src, dst), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=_sigint_as_a_terminal_sends_it)
    return proc, dst


def _assert_stopped_cleanly(proc, dst, sig):
    """Signalled: stopped, one line on stderr, no destination and no temporary left."""
    out, err = proc.communicate(timeout=60)
    assert _stopped(proc.returncode, sig), (proc.returncode, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyconv: stopped"), err
    assert not dst.exists() and siblings(dst) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_copy_stops_cleanly(big, tmp_path, sig):
    src = big["src"]
    proc, dst = _start_signallable(src, tmp_path)
    _wait_for_temporary(dst, proc)
    time.sleep(0.2)
    proc.send_signal(sig)
    _assert_stopped_cleanly(proc, dst, sig)
    assert quick_fingerprint(src) == big["fingerprint"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_while_planning_stops_cleanly(big, tmp_path, sig):
    """Before the copy starts (reading headers, planning) the same holds: exit 130, one line, nothing left."""
    proc, dst = _start_signallable(big["src"], tmp_path)
    # Wait until pyconv's main() runs (it catches SIGTERM from then on: /proc/PID/status, SigCgt), then
    # signal at once: the run is still importing pyconv, reading headers or planning (~1 s), not copying.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not _catches(proc.pid, signal.SIGTERM):
        assert proc.poll() is None, "the conversion ended early"
        time.sleep(0.002)
    copying = any(tmp_pattern(dst).match(e) for e in siblings(dst))
    proc.send_signal(sig)
    print(f"\n{sig.name} sent {'during the copy' if copying else 'before the copy'}")
    _assert_stopped_cleanly(proc, dst, sig)


def _catches(pid, sig):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except OSError:
        pass
    return False


# --- a full disk, a read-only destination ---------------------------------------------------------

def _mount_tmpfs(path, size="4M"):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (no CAP_SYS_ADMIN?): {done.stderr.strip()}")


def _umount(path):
    subprocess.run(["umount", str(path)], check=True)


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    """A 16 MiB fp32 source: its bf16 conversion (8 MiB) does not fit in 4 MiB."""
    root = tmp_path_factory.mktemp("medium")
    return build_source(root / "src", 16 * MIB // (TENSOR_ROWS * TENSOR_COLS * 4), tensors_per_file=128)


def test_disk_full_fails_cleanly(medium, tmp_path):
    disk = tmp_path / "disk"
    _mount_tmpfs(disk)
    try:
        before = quick_fingerprint(medium)
        dst = disk / "out"
        done = subprocess.run(reshard_cmd(medium, dst), cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 2, (done.returncode, done.stderr)
        lines = done.stderr.splitlines()
        assert len(lines) == 1, done.stderr
        assert str(dst) in lines[0] and "no space left" in lines[0].lower(), lines[0]
        assert os.listdir(disk) == []
        assert quick_fingerprint(medium) == before
    finally:
        _umount(disk)


def test_disk_full_fails_cleanly_on_the_cuda_path(medium, tmp_path):
    """--device cuda writes through the core's OutputFile: the same refusal, the same message."""
    pytest.importorskip("triton")
    disk = tmp_path / "disk"
    _mount_tmpfs(disk)
    try:
        dst = disk / "out"
        env = dict(os.environ, TRITON_INTERPRET="1")  # the kernels on the CPU where there is no GPU
        done = subprocess.run(reshard_cmd(medium, dst, "--device", "cuda"), cwd=tmp_path, capture_output=True, text=True,
                              env=env)
        assert done.returncode == 2, (done.returncode, done.stderr)
        lines = done.stderr.splitlines()
        assert len(lines) == 1, done.stderr
        assert str(dst) in lines[0] and "no space left" in lines[0].lower(), lines[0]
        assert os.listdir(disk) == []
    finally:
        _umount(disk)


def test_read_only_destination_fails_cleanly(medium, tmp_path):
    disk = tmp_path / "disk"
    _mount_tmpfs(disk)
    try:
        done = subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot remount the tmpfs read-only: {done.stderr.strip()}")
        for dst in (disk / "out", disk / "sub" / "out"):
            done = subprocess.run(reshard_cmd(medium, dst), cwd=tmp_path, capture_output=True, text=True)
            assert done.returncode == 2, (done.returncode, done.stderr)
            lines = done.stderr.splitlines()
            assert len(lines) == 1, done.stderr
            # The destination is named; where its parent cannot even be created, the parent is.
            named = dst if dst.parent == disk else dst.parent
            assert str(named) in lines[0] and "read-only" in lines[0].lower(), lines[0]
        assert os.listdir(disk) == []
    finally:
        _umount(disk)
