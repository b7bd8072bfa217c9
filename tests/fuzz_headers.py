"""Fuzzer of the untrusted-input parsers: the safetensors header reader and the torch zip reader.

Property: on any bytes, `pyconv.io.safetensors.read_safetensors` and
`pyconv.io.torchzip.read_torch_checkpoint` either succeed or raise `pyconv.FormatError`; never
another exception (and never a crash of the C++ core). The safetensors reader (yyjson in the core)
agrees with the reference reader it replaced (tests/safetensors_reference_reader.py, the standard
library's json): same files accepted, same tensors, same refusals; every tensor lies inside the file.

Inputs (hypothesis):
  - safetensors files with generated JSON headers: random names, dtypes (valid, lowercase, junk,
    non-strings), shapes (small, negative, huge, > int64, floats, bools) and data_offsets, optional
    __metadata__, a true or lying length prefix, data of about the right length;
  - byte mutations (flips, overwrites, inserts, deletions, truncation, a random length prefix) of
    valid safetensors files;
  - byte mutations of a small torch.save file, created once.

    pytest tests/fuzz_headers.py                          # CI slice (derandomized, ~3000 cases)
    python tests/fuzz_headers.py --examples 100000        # the long run (random seeds)

Every file in tests/data/fuzz/ (*.safetensors and *.pt) is replayed by the pytest slice (and fed to
the C++ driver by tests/test_sanitizers.py). The script mode writes the smallest failing input it
finds for each distinct failure there, as fuzz-found-<sha>.{safetensors,pt}.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import struct
import sys
import tempfile
import time
import traceback

import hypothesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

if __name__ == "__main__":  # run as a script from anywhere
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # safetensors_reference_reader

import pyconv  # noqa: E402
from pyconv.io.torchzip import read_torch_checkpoint  # noqa: E402

FUZZ_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "fuzz")
ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
            "F64": 8, "I64": 8, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
CI_EXAMPLES = {"generated": 1500, "mutated": 1000, "torchzip": 600, "dcp": 600, "megatron": 300}

_TMP = tempfile.mkdtemp(prefix="pyconv_fuzz_")
_FAILURES: dict[str, tuple[bytes, str, str]] = {}  # failure signature -> (smallest input, suffix, traceback)
CALLS = {".safetensors": 0, ".pt": 0, ".metadata": 0, "megatron": 0}  # inputs checked (shrinking included)


# ------------------------------------------------------------------------------------------------
# The property


class FuzzFailure(AssertionError):
    pass


def _write(data: bytes, suffix: str) -> str:
    CALLS[suffix] += 1
    path = os.path.join(_TMP, "input" + suffix)
    with open(path, "wb") as f:
        f.write(data)
    return path


def _record(data: bytes, suffix: str, exc: BaseException) -> None:
    tb = traceback.extract_tb(exc.__traceback__)
    where = f"{tb[-1].filename}:{tb[-1].lineno}" if tb else "?"
    key = f"{suffix}:{type(exc).__name__}:{where}"
    known = _FAILURES.get(key)
    if known is None or len(data) < len(known[0]):
        _FAILURES[key] = (data, suffix, "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))


def _outcome(read, path):
    """("ok", value) or ("refused", message); any other exception propagates."""
    try:
        return "ok", read(path)
    except pyconv.FormatError as e:
        return "refused", str(e)


def _same_refusal(core: str, reference: str) -> bool:
    """The core and the reference reader refuse alike: both say the JSON is invalid (each in its
    parser's words), or give the same message up to the value quoted after "got" (the core quotes
    the literal as written, the reference json.dumps of the parsed value), up to a NUL (the core's
    messages end there) and with integers of 40 digits and more cut short (the core cuts them)."""
    if "header is not valid JSON" in reference:
        return "header is not valid JSON" in core
    core, reference = (re.sub(r"\d{40,}(\.\.\.)?", "<long>", m.split("\0")[0].split(", got ")[0]) for m in (core, reference))
    return core == reference


def check_safetensors_bytes(data: bytes) -> None:
    """The core's header reader agrees with the reference reader (the json-module one it replaced,
    tests/safetensors_reference_reader.py): it accepts exactly the same files, gives the same
    tensors and metadata, and refuses the rest alike; every tensor it returns lies in the file."""
    from pyconv.io.safetensors import _read_header
    from safetensors_reference_reader import reference_read_header

    path = _write(data, ".safetensors")
    try:
        core = _outcome(_read_header, path)
        reference = _outcome(reference_read_header, path)
    except Exception as e:  # noqa: BLE001 - anything else is the bug being hunted
        _record(data, ".safetensors", e)
        raise FuzzFailure(f"a header reader raised {type(e).__name__}: {e}") from e
    disagreement = None
    if core[0] != reference[0]:
        disagreement = f"the core {core[0]} ({core[1] if core[0] == 'refused' else 'read it'}) where the reference " \
                       f"{reference[0]} ({reference[1] if reference[0] == 'refused' else 'read it'})"
    elif core[0] == "refused" and not _same_refusal(core[1], reference[1]):
        disagreement = f"the core refused with {core[1]!r}, the reference with {reference[1]!r}"
    elif core[0] == "ok" and (list(core[1].tensors.items()) != list(reference[1].tensors.items())
                              or core[1].metadata != reference[1].metadata):
        disagreement = "the core and the reference read different tensors or metadata"
    if disagreement:
        err = FuzzFailure(disagreement)
        _record(data, ".safetensors", err)
        raise err
    if core[0] == "refused":
        return
    size = len(data)
    for name, t in core[1].tensors.items():
        n = ITEMSIZE[t.dtype]
        for d in t.shape:
            n *= d
        if not (0 <= t.offset and t.offset + n <= size):
            err = FuzzFailure(f"tensor {name!r} at {t.offset} (+{n}) lies outside the {size}-byte file")
            _record(data, ".safetensors", err)
            raise err


def _only_format_error(data: bytes, suffix: str, read, what: str) -> None:
    """read() may succeed or raise FormatError; anything else is recorded and fails."""
    try:
        read()
    except pyconv.FormatError:
        return
    except Exception as e:  # noqa: BLE001
        _record(data, suffix, e)
        raise FuzzFailure(f"{what} raised {type(e).__name__}: {e}") from e


def check_torch_bytes(data: bytes) -> None:
    path = _write(data, ".pt")
    _only_format_error(data, ".pt", lambda: read_torch_checkpoint(path), "read_torch_checkpoint")


def check_dcp_metadata_bytes(data: bytes) -> None:
    """A DCP `.metadata` pickle (torch_dist): read_metadata may only raise FormatError."""
    from pyconv.io.dcp import METADATA_FILE, read_metadata

    directory = os.path.join(_TMP, "dcp")
    os.makedirs(directory, exist_ok=True)
    CALLS[".metadata"] += 1
    with open(os.path.join(directory, METADATA_FILE), "wb") as f:
        f.write(data)
    _only_format_error(data, ".metadata", lambda: read_metadata(directory), "read_metadata")


# ------------------------------------------------------------------------------------------------
# Strategies

_ints = st.one_of(
    st.integers(0, 16),
    st.integers(-4, 64),
    st.sampled_from([2**31 - 1, 2**31, 2**32, 2**32 + 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1,
                     10**30, -1]),
    st.integers(-(2**70), 2**70),
)
_dims = st.one_of(_ints, st.floats(allow_nan=False, allow_infinity=False), st.booleans(), st.none(),
                  st.text(max_size=3), st.just([1]))
_dtypes = st.one_of(st.sampled_from(sorted(ITEMSIZE)), st.sampled_from(["f32", "F31", "", "F8_E4M3FN", "bf16", "F32 "]),
                    st.text(max_size=6), st.integers(), st.none(), st.just(["F32"]))


@st.composite
def _entry(draw):
    entry = {}
    if draw(st.integers(0, 19)):
        entry["dtype"] = draw(_dtypes)
    if draw(st.integers(0, 19)):
        entry["shape"] = draw(st.one_of(st.lists(_dims, max_size=5), _dims))
    if draw(st.integers(0, 19)):
        entry["data_offsets"] = draw(st.one_of(st.lists(_ints, min_size=2, max_size=2), st.lists(_dims, max_size=3), _dims))
    if draw(st.integers(0, 9)) == 0:
        entry[draw(st.text(max_size=4))] = draw(_dims)
    return entry if draw(st.integers(0, 29)) else draw(_dims)


@st.composite
def _valid_layout(draw):
    """Entries stored back to back from 0 (a valid header), and the data size."""
    tensors = draw(st.lists(st.tuples(st.sampled_from(sorted(ITEMSIZE)), st.lists(st.integers(0, 5), max_size=3)),
                            max_size=5))
    header, pos = {}, 0
    for i, (dtype, shape) in enumerate(tensors):
        n = ITEMSIZE[dtype]
        for d in shape:
            n *= d
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + n]}
        pos += n
    return header, pos


@st.composite
def generated_safetensors(draw) -> bytes:
    if draw(st.booleans()):
        header, size = draw(_valid_layout())
        # Perturb a few fields of the valid layout.
        for _ in range(draw(st.integers(0, 3))):
            if not header:
                break
            name = draw(st.sampled_from(sorted(header)))
            field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "drop", "dup"]))
            if field == "dtype":
                header[name]["dtype"] = draw(_dtypes)
            elif field == "shape":
                header[name]["shape"] = draw(st.lists(_dims, max_size=4))
            elif field == "data_offsets":
                header[name]["data_offsets"] = draw(st.lists(_ints, min_size=2, max_size=2))
            elif field == "drop":
                del header[name]
            else:
                header[name + "x"] = dict(header[name])
    else:
        header = draw(st.dictionaries(st.text(max_size=8), _entry(), max_size=5))
        size = draw(st.integers(0, 64))
    if draw(st.integers(0, 3)) == 0:
        header["__metadata__"] = draw(st.one_of(st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=3),
                                                st.dictionaries(st.text(max_size=4), _dims, max_size=2), _dims))
    text = json.dumps(header, ensure_ascii=draw(st.booleans()), allow_nan=True)
    raw = text.encode("utf-8", "surrogatepass")
    raw += b" " * draw(st.integers(0, 9))
    if draw(st.integers(0, 9)) == 0:
        raw = draw(st.sampled_from([b"", b" ", b"[", b"\xff", b"{\"a\":", b"\xed\xa0\x80"])) + raw
    length = len(raw)
    if draw(st.integers(0, 7)) == 0:
        length = draw(st.one_of(st.integers(0, len(raw) + 16), st.integers(0, 2**64 - 1)))
    data = bytes(max(0, size + draw(st.integers(-4, 4))))
    return struct.pack("<Q", length) + raw + data


def _mutate(draw, base: bytes, max_ops: int = 4, lo: int = 0) -> bytes:
    """Up to max_ops random edits of base; positions below lo are left alone while the input is longer."""
    buf = bytearray(base)
    for _ in range(draw(st.integers(1, max_ops))):
        op = draw(st.integers(0, 6))
        n = len(buf)
        first = lo if n > lo + 8 else 0
        if op == 0 and n:  # flip bits of one byte
            i = draw(st.integers(first, n - 1))
            buf[i] ^= draw(st.integers(1, 255))
        elif op == 1 and n:  # overwrite one byte with an interesting value
            i = draw(st.integers(first, n - 1))
            buf[i] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, ord('"'), ord("{"), ord("}"), ord("-"), ord("9"),
                                           ord(","), ord("["), ord("]"), ord("e"), ord("\\")]))
        elif op == 2:  # insert bytes
            i = draw(st.integers(first, n))
            buf[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == 3 and n:  # delete a range
            i = draw(st.integers(first, n - 1))
            del buf[i:i + draw(st.integers(1, 16))]
        elif op == 4 and n:  # truncate
            del buf[draw(st.integers(first, n - 1)):]
        elif op == 5 and n >= 8:  # a random little-endian u64 somewhere (length prefix, zip fields)
            i = draw(st.one_of(st.just(0), st.integers(first, n - 8)))
            buf[i:i + 8] = struct.pack("<Q", draw(st.one_of(st.integers(0, n + 16), st.integers(0, 2**64 - 1))))
        elif op == 6 and n >= 4:  # a random u32 / u16 (zip sizes, offsets, counts)
            i = draw(st.integers(first, n - 4))
            if draw(st.booleans()):
                buf[i:i + 4] = struct.pack("<I", draw(st.sampled_from([0, 1, 0xFFFF, 0xFFFFFFFF, n, n + 1, 2**31])))
            else:
                buf[i:i + 2] = struct.pack("<H", draw(st.sampled_from([0, 1, 0xFFFF, n & 0xFFFF])))
    return bytes(buf)


@st.composite
def mutated_safetensors(draw) -> bytes:
    header, size = draw(_valid_layout())
    if draw(st.booleans()):
        header = {"__metadata__": {"format": "pt"}, **header}
    raw = json.dumps(header, separators=(",", ":")).encode()
    base = struct.pack("<Q", len(raw)) + raw + bytes(size)
    return _mutate(draw, base)


_TORCH_BASE: bytes | None = None


def torch_base() -> bytes:
    """A small torch.save file (two tensors, a nested dict), made once."""
    global _TORCH_BASE
    if _TORCH_BASE is None:
        import torch

        obj = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "n": {"b": torch.ones(3, dtype=torch.bfloat16)},
               "step": 7}
        buf = io.BytesIO()
        torch.save(obj, buf)
        _TORCH_BASE = buf.getvalue()
    return _TORCH_BASE


@st.composite
def mutated_torch(draw) -> bytes:
    # Mostly past the 4-byte zip signature: hypothesis favours small positions, and a broken
    # signature is refused at once.
    return _mutate(draw, torch_base(), max_ops=3, lo=draw(st.sampled_from([0, 4, 4, 4, 30, 30])))


# ------------------------------------------------------------------------------------------------
# Targets (plain functions, wrapped with @given by make_targets)


def _fuzz_generated(data):
    check_safetensors_bytes(data)


def _fuzz_mutated(data):
    check_safetensors_bytes(data)


def _fuzz_torchzip(data):
    check_torch_bytes(data)


_DCP_BASE: bytes | None = None


def dcp_base() -> bytes:
    """A small `.metadata` as pyconv's torch_dist writer makes it (two tensors, three chunks)."""
    global _DCP_BASE
    if _DCP_BASE is None:
        from pyconv.io.dcp import DcpChunk, DcpTensor, ItemLocation, metadata_pickle

        tensors = [DcpTensor("decoder.layers.self_attention.linear_qkv.weight", "BF16", (2, 6, 4),
                             (DcpChunk((0, 0, 0), (1, 6, 4), ItemLocation("__0_0.distcp", 0, 900)),
                              DcpChunk((1, 0, 0), (1, 6, 4), ItemLocation("__0_0.distcp", 900, 900)))),
                   DcpTensor("embedding.word_embeddings.weight", "F32", (8, 4),
                             (DcpChunk((0, 0), (8, 4), ItemLocation("__0_1.distcp", 0, 1100)),))]
        _DCP_BASE = metadata_pickle(tensors, {"decoder.layers.self_attention.linear_qkv._extra_state/shard_0_2":
                                              ItemLocation("__0_1.distcp", 1100, 400)}, "fuzz")
    return _DCP_BASE


@st.composite
def mutated_dcp(draw) -> bytes:
    return _mutate(draw, dcp_base(), max_ops=3, lo=draw(st.sampled_from([0, 2, 2, 20])))


def _fuzz_dcp(data):
    check_dcp_metadata_bytes(data)


_MEGATRON_BASE: bytes | None = None


def megatron_base() -> bytes:
    """The rank file of a tiny Llama (3 layers) at tp = pp = 1, as pyconv's megatron writer makes it."""
    global _MEGATRON_BASE
    if _MEGATRON_BASE is None:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from test_output_hashes import make_source

        root = tempfile.mkdtemp(prefix="pyconv_fuzz_megatron_")
        src = make_source("llama", __import__("pathlib").Path(root))
        pyconv.reshard(src, os.path.join(root, "meg"), to="megatron")
        with open(os.path.join(root, "meg", "release", "mp_rank_00", "model_optim_rng.pt"), "rb") as f:
            _MEGATRON_BASE = f.read()
    return _MEGATRON_BASE


# Where the rank file goes: (iteration directory, rank directory, file name), plus strays beside it.
_RANK_PLACES = [("release", "mp_rank_00", "model_optim_rng.pt"), ("release", "mp_rank_00", "model_rng.pt"),
                ("iter_0000007", "mp_rank_00", "model_optim_rng.pt"), ("release", "mp_rank_00_000", "model_optim_rng.pt"),
                ("release", "mp_rank_00_000_000", "model_optim_rng.pt"), ("release", "mp_rank_01", "model_optim_rng.pt"),
                ("release", "mp_rank_0", "model_optim_rng.pt"), ("", "mp_rank_00", "model_optim_rng.pt")]
_STRAYS = [(), ("release/mp_rank_00_000/optim.pt",), ("release/mp_rank_00/distrib_optim.pt",), ("release/mp_rank_01/",),
           ("iter_0000009/mp_rank_00/model_optim_rng.pt",), ("release/mp_rank_00_000/model_optim_rng.pt",),
           ("release/mp_rank_00/model_rng.pt",), ("iter_0000007/",)]


@st.composite
def mutated_megatron(draw):
    """(rank file bytes, tracker bytes or None, where the rank file goes, stray entries)."""
    rank = _mutate(draw, megatron_base(), max_ops=2, lo=draw(st.sampled_from([4, 30, 400, 2000])))
    if draw(st.integers(0, 3)) == 0:
        rank = megatron_base()  # the structure alone varies
    tracker = draw(st.one_of(st.none(), st.sampled_from([b"release", b"7", b"9", b"\xc2\xb2", b"release\n" + b"x" * 80,
                                                         b"-5", b"0007"]), st.binary(max_size=12)))
    return rank, tracker, draw(st.sampled_from(_RANK_PLACES)), draw(st.sampled_from(_STRAYS))


def check_megatron_directory(case) -> None:
    """pyconv.open of a Megatron checkpoint directory may succeed or raise a PyconvError (bad
    input, one line); nothing else."""
    import shutil

    rank, tracker, (iteration, rank_dir, file_name), strays = case
    root = os.path.join(_TMP, "megatron")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(os.path.join(root, iteration, rank_dir))
    CALLS["megatron"] += 1
    with open(os.path.join(root, iteration, rank_dir, file_name), "wb") as f:
        f.write(rank)
    if tracker is not None:
        with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "wb") as f:
            f.write(tracker)
    for stray in strays:
        os.makedirs(os.path.join(root, os.path.dirname(stray)), exist_ok=True)
        if not stray.endswith("/"):
            with open(os.path.join(root, stray), "wb") as f:
                f.write(rank[: len(rank) // 2] if stray.endswith("optim.pt") else rank)
    try:
        pyconv.open(root)
    except pyconv.PyconvError:
        return
    except Exception as e:  # noqa: BLE001
        _record(rank, ".megatron.pt", e)
        raise FuzzFailure(f"pyconv.open raised {type(e).__name__}: {e} (tracker {tracker!r}, {iteration}/{rank_dir}/"
                          f"{file_name}, strays {strays})") from e


def _fuzz_megatron(case):
    check_megatron_directory(case)


STRATEGIES = {"generated": (_fuzz_generated, generated_safetensors()), "mutated": (_fuzz_mutated, mutated_safetensors()),
              "torchzip": (_fuzz_torchzip, mutated_torch()), "dcp": (_fuzz_dcp, mutated_dcp()),
              "megatron": (_fuzz_megatron, mutated_megatron())}


def make_target(kind: str, examples: int, derandomize: bool):
    fn, strategy = STRATEGIES[kind]
    return settings(max_examples=examples, deadline=None, derandomize=derandomize, database=None, print_blob=True,
                    suppress_health_check=list(HealthCheck))(given(strategy)(fn))


# ------------------------------------------------------------------------------------------------
# pytest: the CI slice and the regression corpus


def _corpus() -> list[str]:
    if not os.path.isdir(FUZZ_DIR):
        return []
    return sorted(n for n in os.listdir(FUZZ_DIR) if n.endswith((".safetensors", ".pt", ".metadata")))


def test_fuzz_regression_corpus():
    names = _corpus()
    for name in names:
        with open(os.path.join(FUZZ_DIR, name), "rb") as f:
            data = f.read()
        check = {".pt": check_torch_bytes, ".metadata": check_dcp_metadata_bytes}.get(os.path.splitext(name)[1],
                                                                                    check_safetensors_bytes)
        check(data)


def test_torch_base_is_readable():
    path = _write(torch_base(), ".pt")
    ckpt = read_torch_checkpoint(path)
    assert ckpt is not None


def _ci(kind):
    def test():
        make_target(kind, CI_EXAMPLES[kind], derandomize=True)()
    test.__name__ = f"test_fuzz_{kind}_ci_slice"
    return test


test_fuzz_generated_ci_slice = _ci("generated")
test_fuzz_mutated_ci_slice = _ci("mutated")
test_fuzz_torchzip_ci_slice = _ci("torchzip")
test_fuzz_dcp_ci_slice = _ci("dcp")
test_fuzz_megatron_ci_slice = _ci("megatron")


def test_dcp_base_is_readable(tmp_path):
    from pyconv.io.dcp import METADATA_FILE, read_metadata

    (tmp_path / METADATA_FILE).write_bytes(dcp_base())
    assert len(read_metadata(str(tmp_path)).tensors) == 2


# ------------------------------------------------------------------------------------------------
# Script: the long run


def _save_failures() -> list[str]:
    os.makedirs(FUZZ_DIR, exist_ok=True)
    written = []
    for key, (data, suffix, tb) in sorted(_FAILURES.items()):
        name = f"fuzz-found-{hashlib.sha256(data).hexdigest()[:16]}{suffix}"
        with open(os.path.join(FUZZ_DIR, name), "wb") as f:
            f.write(data)
        written.append(name)
        print(f"\n=== {key} -> tests/data/fuzz/{name} ({len(data)} bytes)\n{tb}", file=sys.stderr)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=100_000, help="total cases over all targets (default 100000)")
    ap.add_argument("--targets", default="generated,mutated,torchzip,dcp,megatron")
    ap.add_argument("--batch", type=int, default=5000, help="cases per hypothesis run (fresh random seed each)")
    args = ap.parse_args(argv)
    kinds = args.targets.split(",")
    share = {"generated": 0.3, "mutated": 0.3, "torchzip": 0.2, "dcp": 0.2, "megatron": 0.2}
    total_share = sum(share[k] for k in kinds)
    start = time.monotonic()
    counts = {}
    failed = False
    for kind in kinds:
        want = int(args.examples * share[kind] / total_share)
        done = 0
        t0 = time.monotonic()
        while done < want:
            n = min(args.batch, want - done)
            try:
                make_target(kind, n, derandomize=False)()
            except Exception as e:  # noqa: BLE001 - a falsifying example: keep going with other targets
                print(f"{kind}: FAILURE after ~{done} cases: {type(e).__name__}: {e}", file=sys.stderr)
                failed = True
                done += n
                break
            done += n
        counts[kind] = done
        print(f"{kind}: {done} cases (inputs checked so far: {CALLS}) in {time.monotonic() - t0:.1f} s", flush=True)
    written = _save_failures()
    print(f"total: {sum(counts.values())} cases in {time.monotonic() - start:.1f} s; "
          f"{'FAILURES: ' + ', '.join(written) if failed or written else 'no failure (only FormatError raised)'}")
    return 1 if failed or written else 0


if __name__ == "__main__":
    sys.exit(main())
