"""Measuring helpers shared by every benchmark in bench/: one implementation of each.

run_measured() runs a command and samples the peak resident memory of its whole process tree
(the command and every descendant: `sh -c 'cp ... && sync'`, torchrun and its ranks) from
/proc/PID/status; the rest describes the machine and controls the page cache.
"""

from __future__ import annotations

import glob
import hashlib
import os
import platform
import subprocess
import sys
import sysconfig
import threading
import time

GiB = 1 << 30
MiB = 1 << 20
GB = 1e9

def dir_files(path: str) -> dict[str, int]:
    out = {}
    for root, _, names in os.walk(path):
        for n in names:
            p = os.path.join(root, n)
            out[os.path.relpath(p, path)] = os.path.getsize(p)
    return out



def run_in_child(work, what: str) -> None:
    """Runs work() in a forked child (numpy stays out of the measuring process, whose memory
    high-water mark every child it launches inherits in ru_maxrss)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            work()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{what} failed")


_STATUS_KEYS = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")


def read_status(pid: int) -> dict[str, int] | None:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            text = f.read().decode()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in _STATUS_KEYS:
            out[key] = int(value.split()[0]) * 1024  # kB -> bytes
    return out


def _vmstat() -> dict[str, int]:
    out = {}
    with open("/proc/vmstat") as f:
        for line in f:
            k, v = line.split()
            if k in ("pgpgin", "pgpgout"):
                out[k] = int(v) * 1024  # counted in KiB
    return out


def _cpu_times() -> tuple[float, float]:
    """(busy, iowait) CPU seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / tick, iowait / tick


def wait_idle(max_wait_s: float, busy_limit: float = 0.25, window_s: float = 1.0) -> float:
    """Waits (at most max_wait_s) until the machine's CPUs were busy less than busy_limit of one
    CPU over a window_s window; returns the busy fraction of the last window. On a shared machine
    this keeps other people's work out of the measured interval as far as possible."""
    deadline = time.monotonic() + max_wait_s
    while True:
        b0 = _cpu_times()[0]
        time.sleep(window_s)
        busy = (_cpu_times()[0] - b0) / window_s
        if busy < busy_limit or time.monotonic() >= deadline:
            return busy


def _descendants(pid: int) -> list[int]:
    """pid and every process below it (children lists of every thread, recursively)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for children in glob.glob(f"/proc/{p}/task/*/children"):
            try:
                with open(children) as f:
                    todo += [int(c) for c in f.read().split()]
            except OSError:  # the thread or process is gone
                pass
    return out


def run_measured(argv: list[str], sample_s: float = 0.02, env=None, check: bool = True) -> dict:
    """Runs argv; returns wall time, wait4 rusage and the maxima of /proc/PID/status fields.

    Memory is sampled every sample_s seconds over the whole process tree: the peaks of the
    sums over the tree (peak_rss_*), and of the command's own process (own_peak_rss_*)."""
    vm0 = _vmstat()
    load0 = os.getloadavg()[0]
    cpu0 = _cpu_times()
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    peaks = {k: 0 for k in _STATUS_KEYS}
    own = {k: 0 for k in _STATUS_KEYS}
    samples = [0, 1]  # samples taken, most processes seen at once
    done = threading.Event()

    def sample():
        while not done.is_set():
            total = dict.fromkeys(_STATUS_KEYS, 0)
            pids = _descendants(proc.pid)
            for pid in pids:
                st = read_status(pid)
                if not st:
                    continue
                for k, v in st.items():
                    total[k] += v
                    if pid == proc.pid:
                        own[k] = max(own[k], v)
            samples[0] += 1
            samples[1] = max(samples[1], len(pids))
            for k, v in total.items():
                peaks[k] = max(peaks[k], v)
            done.wait(sample_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    # Read the pipes without reaping the child, then reap it with wait4 for its own rusage.
    out_chunks, err_chunks = [], []
    readers = [threading.Thread(target=lambda s=s, b=b: b.append(s.read()), daemon=True)
               for s, b in ((proc.stdout, out_chunks), (proc.stderr, err_chunks))]
    for r in readers:
        r.start()
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    done.set()
    sampler.join()
    for r in readers:
        r.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    vm1 = _vmstat()
    cpu1 = _cpu_times()
    stdout = b"".join(out_chunks).decode(errors="replace")
    stderr = b"".join(err_chunks).decode(errors="replace")
    if check and proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed with exit code {proc.returncode}:\n{stderr}")
    return {
        "argv": argv, "wall_s": wall, "user_s": ru.ru_utime, "sys_s": ru.ru_stime,
        "ru_maxrss_bytes": ru.ru_maxrss * 1024, "majflt": ru.ru_majflt, "minflt": ru.ru_minflt,
        "peak_vmhwm_bytes": peaks["VmHWM"], "peak_rss_bytes": peaks["VmRSS"],
        "peak_rss_anon_bytes": peaks["RssAnon"], "peak_rss_file_bytes": peaks["RssFile"],
        "peak_rss_shmem_bytes": peaks["RssShmem"], "status_samples": samples[0], "max_processes": samples[1],
        "own_peak_rss_anon_bytes": own["RssAnon"], "own_peak_rss_file_bytes": own["RssFile"],
        "returncode": proc.returncode,
        "system_pgpgin_bytes": vm1["pgpgin"] - vm0["pgpgin"], "system_pgpgout_bytes": vm1["pgpgout"] - vm0["pgpgout"],
        "loadavg1_before": load0,
        # CPU time the rest of the machine used meanwhile (other users' work competes for the
        # same cores; runs with a large figure here are noisy), and time spent waiting for I/O.
        "others_cpu_s": max(0.0, cpu1[0] - cpu0[0] - ru.ru_utime - ru.ru_stime), "iowait_s": cpu1[1] - cpu0[1], "stdout": stdout[-4000:], "stderr": stderr[-4000:],
    }


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def warm(path: str) -> None:
    """Reads every file once so the source is in the page cache."""
    buf = bytearray(MiB)
    for rel in sorted(dir_files(path)):
        with open(os.path.join(path, rel), "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def pyconv_argv() -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "pyconv")
    return [exe] if os.access(exe, os.X_OK) else [sys.executable, "-m", "pyconv"]


def core_identity() -> dict:
    """Which compiled core ran: other people rebuild it, so each run records it."""
    # Found by name, not imported: importing pyconv here would raise this process's RSS.
    candidates = []
    for key in ("platlib", "purelib"):
        candidates += glob.glob(os.path.join(sysconfig.get_paths()[key], "pyconv", "_core*.so"))
    candidates += glob.glob(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyconv", "_core*.so"))
    if not candidates:
        return {"error": "pyconv/_core*.so not found"}
    path = candidates[0]
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    return {"path": path, "sha256_16": digest,
            "mtime": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(os.path.getmtime(path)))}


def machine() -> dict:
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu": cpu, "mem_bytes": mem, "kernel": platform.release(),
            "python": platform.python_version()}


def free_page_reporting() -> bool | None:
    """Whether the kernel reports free pages to a hypervisor (see --settle)."""
    try:
        with open("/proc/cmdline") as f:
            cmdline = f.read()
        return "page_reporting" in cmdline or os.path.isdir("/sys/module/virtio_balloon")
    except OSError:
        return None


def filesystem(path: str) -> str:
    try:
        out = subprocess.run(["df", "-T", path], capture_output=True, text=True, check=True).stdout.splitlines()
        dev, fstype = out[1].split()[:2]
        return f"{fstype} on {dev}"
    except Exception:  # noqa: BLE001
        return "unknown"
