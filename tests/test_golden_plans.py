"""Golden plans: the exact block copies every planner emits for tiny models, with no tensor I/O.

As PyTorch DCP's test_planner.py (test_load_with_resharding) pins the read items of a reshard,
these tests pin the plans of pyconv's writers: for chosen tensors, every BlockCopy (source file,
byte offset, row stride, rows x cols, destination row/col, dtype, transpose), and the output
files, tensor names, shapes, dtypes and byte offsets.

The expected values are written out here from the layout rules (the design's "block copy"
section: fused QKV per query group, gated fc1, vocab padding, experts, pipeline placement), not
recorded from pyconv's output and not computed with pyconv's layout functions. Source byte offsets come
from this file's own bookkeeping: the tiny Hugging Face sources are safetensors files written by
hand (zeros: nothing is executed), so the test knows where every element lies; Megatron rank
files (setup for the inverse and TP 8 -> 4 plans) and the torch.save archives a plan lays out
are read with the standard library's zipfile and pickle (`torch_archive`), the DCP `.metadata`
with torch's own unpickler.

The models are small enough to check by hand, e.g. the Llama: hidden 8, 4 heads of head_dim 3
(!= hidden / heads), 2 KV heads, ffn 16, vocab 14, 4 layers, fp32.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import math
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import flatten_state_dict

import pyconv

F32 = 4
TOKENIZER = b'{"version": "1.0"}\n'


# ---- the one door to the planner --------------------------------------------------------------

def plan(src, to: str, **layout):
    """The plan of converting src to `to`: pyconv's public planner, headers only, nothing written.
    Every test goes through here, so a regrouping of the planner's keyword arguments is one edit."""
    return pyconv.plan_reshard(str(src), to=to, **layout)


def write(src, dst, to: str, **layout) -> Path:
    """Setup only: a real checkpoint to plan from (Megatron rank files for the inverse plans)."""
    pyconv.reshard(str(src), str(dst), to=to, threads=2, **layout)
    return Path(dst)


# ---- tiny Hugging Face sources, written by hand -----------------------------------------------

@dataclass
class Source:
    """A hand-written model.safetensors: each tensor's shape and where its bytes start."""

    dir: Path
    file: str
    offsets: dict[str, int]
    shapes: dict[str, tuple[int, ...]]

    def at(self, name: str, row: int = 0, col: int = 0) -> int:
        """Absolute byte offset of element [row, col] of the tensor's row-major 2-D view."""
        return self.offsets[name] + (row * view2d(self.shapes[name])[1] + col) * F32

    def row_bytes(self, name: str) -> int:
        return view2d(self.shapes[name])[1] * F32


def view2d(shape) -> tuple[int, int]:
    """The 2-D view block copies address: [prod(shape[:-1]), shape[-1]], a vector as [n, 1]."""
    return (shape[0], 1) if len(shape) == 1 else (math.prod(shape[:-1]), shape[-1])


def make_hf(root: Path, config: dict, tensors: list[tuple[str, list[int]]]) -> Source:
    """config.json, a tokenizer stand-in and one fp32 model.safetensors of zeros, tensors in the
    given order. The JSON header is padded with spaces so that the data section starts at a
    multiple of 4096 (at 8 + 4088 = 4096 for the Llama)."""
    root.mkdir(parents=True)
    header, position, relative = {}, 0, {}
    for name, shape in tensors:
        nbytes = math.prod(shape) * F32
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [position, position + nbytes]}
        relative[name] = position
        position += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    data_start = -(-(8 + len(text)) // 4096) * 4096
    text += b" " * (data_start - 8 - len(text))
    offsets = {name: data_start + r for name, r in relative.items()}
    (root / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + bytes(position))
    (root / "config.json").write_text(json.dumps(config, indent=1))
    (root / "tokenizer.json").write_bytes(TOKENIZER)
    return Source(root, str((root / "model.safetensors").resolve()), offsets,
                  {name: tuple(shape) for name, shape in tensors})


def llama_source(root: Path, hidden=8, heads=4, kv=2, head_dim=3, ffn=16, vocab=14, layers=4) -> Source:
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": head_dim,
              "intermediate_size": ffn, "vocab_size": vocab, "num_hidden_layers": layers,
              "max_position_embeddings": 32, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
              "hidden_act": "silu", "dtype": "float32"}
    tensors = [("model.embed_tokens.weight", [vocab, hidden])]
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors += [(p + "input_layernorm.weight", [hidden]),
                    (p + "self_attn.q_proj.weight", [heads * head_dim, hidden]),
                    (p + "self_attn.k_proj.weight", [kv * head_dim, hidden]),
                    (p + "self_attn.v_proj.weight", [kv * head_dim, hidden]),
                    (p + "self_attn.o_proj.weight", [hidden, heads * head_dim]),
                    (p + "post_attention_layernorm.weight", [hidden]),
                    (p + "mlp.gate_proj.weight", [ffn, hidden]),
                    (p + "mlp.up_proj.weight", [ffn, hidden]),
                    (p + "mlp.down_proj.weight", [hidden, ffn])]
    tensors += [("model.norm.weight", [hidden]), ("lm_head.weight", [vocab, hidden])]
    return make_hf(root, config, tensors)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Source:
    return llama_source(tmp_path_factory.mktemp("golden") / "llama")


# ---- reading plans and archives without pyconv -------------------------------------------------

Copy = tuple  # (source, src_offset, src_row_stride, src_dtype, rows, cols, dst_row, dst_col, transpose)
# The executor takes no other BlockCopy fields here: none of these sources is fp8 (no scale grid).


def copies(tensor) -> list[Copy]:
    """A planned tensor's block copies as plain tuples, in destination order (the order in which
    a plan lists them carries no meaning; the executor sorts by source offset anyway)."""
    out = []
    for c in tensor.copies:
        assert c.scale_source is None, c
        out.append((c.source, c.src_offset, c.src_row_stride, c.src_dtype, c.rows, c.cols, c.dst_row, c.dst_col,
                    c.transpose))
    return sorted(out, key=lambda c: (c[6], c[7]))


def blk(src: Source, name: str, row: int, col: int, rows: int, cols: int, dst_row: int = 0, dst_col: int = 0,
        *, stride: int | None = None, transpose: bool = False) -> Copy:
    """The expected copy of rows x cols of HF tensor `name` from its element [row, col]."""
    return (src.file, src.at(name, row, col), src.row_bytes(name) if stride is None else stride, "F32",
            rows, cols, dst_row, dst_col, transpose)


def repeat_row(src: Source, name: str, row: int, times: int, cols: int, dst_row: int) -> Copy:
    """Vocabulary padding: one source row written `times` times (row stride 0)."""
    return (src.file, src.at(name, row, 0), 0, "F32", times, cols, dst_row, 0, False)


def by_path(p) -> dict:
    return {f.path: f for f in p.files}


def tensors_of(planned_file) -> dict:
    names = [t.name for t in planned_file.tensors]
    assert len(names) == len(set(names)), names
    return {t.name: t for t in planned_file.tensors}


def image(planned_file) -> bytes:
    """The bytes a plan's file will have, with the tensor data left zero: its literals in place."""
    data = bytearray(planned_file.size)
    for offset, literal in planned_file.literals:
        data[offset:offset + len(literal)] = literal
    return bytes(data)


@dataclass(frozen=True)
class Stored:
    """A tensor of a torch.save archive: dtype, shape and the byte offset of its data."""

    dtype: str
    shape: tuple[int, ...]
    offset: int

    def at(self, row: int = 0, col: int = 0) -> int:
        return self.offset + (row * view2d(self.shape)[1] + col) * F32


_STORAGE_DTYPES = {"FloatStorage": ("F32", 4), "BFloat16Storage": ("BF16", 2), "HalfStorage": ("F16", 2)}


def torch_archive(data: bytes, base: int = 0):
    """The object in a torch.save zip archive, each tensor a Stored whose offset is where its data
    lies in the archive (+ base). Written with zipfile and pickle only; torch.load would see the
    same tree (storages are uncompressed zip records, tensors _rebuild_tensor_v2 calls)."""
    archive = zipfile.ZipFile(io.BytesIO(data))
    records = {}
    for info in archive.infolist():
        assert info.compress_type == zipfile.ZIP_STORED
        name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
        start = info.header_offset + 30 + name_len + extra_len
        records[info.filename.split("/", 1)[1]] = (start, info.file_size)
    start, size = records["data.pkl"]

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                def rebuild(storage, storage_offset, shape, stride, *rest):
                    (dtype, itemsize), key = storage
                    row_major = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
                    assert tuple(stride) == row_major, f"not contiguous: {shape} {stride}"
                    return Stored(dtype, tuple(shape), base + records[f"data/{key}"][0] + storage_offset * itemsize)
                return rebuild
            if (module, name) == ("collections", "OrderedDict"):
                return collections.OrderedDict
            if (module, name) == ("argparse", "Namespace"):
                return argparse.Namespace
            return f"{module}.{name}"  # torch dtypes and storage classes: their names suffice

        def persistent_load(self, pid):
            kind, storage_class, key, _location, _numel = pid
            assert kind == "storage"
            return _STORAGE_DTYPES[storage_class.rsplit(".", 1)[1]], key

    return Unpickler(io.BytesIO(data[start:start + size])).load()


def check_archive(planned_file, chunks=("model",)) -> dict:
    """Opens the archive a planned Megatron rank file lays out: every planned tensor is the tensor
    of that name in the pickled state dict(s), same dtype and shape, its offset where the zip
    record of its storage puts the data. Returns the archive's top-level object."""
    obj = torch_archive(image(planned_file))
    in_archive = [(name, s) for chunk in chunks for name, s in obj[chunk].items()]
    assert [name for name, _ in in_archive] == [t.name for t in planned_file.tensors]
    for (name, stored), t in zip(in_archive, planned_file.tensors):
        assert (stored.dtype, stored.shape, stored.offset) == (t.dtype, t.shape, t.offset), name
        assert t.offset % 64 == 0  # torch.save aligns storages to 64 bytes
    return obj


def shapes(planned_file) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(t.name, t.dtype, t.shape) for t in planned_file.tensors]


def check_safetensors_layout(planned_file) -> dict:
    """The planned file's header literal parses, lists every planned tensor with its dtype and shape,
    sorted by name (fp32 only, as safetensors' save_file sorts), data packed from right after the
    header; the planned offsets are where the header puts each tensor. Returns {name: tensor}."""
    ((zero, header),) = planned_file.literals
    (length,) = struct.unpack("<Q", header[:8])
    assert zero == 0 and len(header) == 8 + length
    entries = {k: v for k, v in json.loads(header[8:]).items() if k != "__metadata__"}
    assert list(entries) == sorted(entries)
    t = tensors_of(planned_file)
    assert sorted(t) == list(entries)
    position = 0
    for name, entry in entries.items():
        size = math.prod(entry["shape"]) * F32
        assert entry["data_offsets"] == [position, position + size]
        assert (t[name].dtype, list(t[name].shape), t[name].offset) == (entry["dtype"], entry["shape"],
                                                                         len(header) + position)
        position += size
    assert planned_file.size == len(header) + position
    return t


# ---- HF -> Megatron -----------------------------------------------------------------------------

def llama_megatron_names(layers):
    """TransformerEngine names of the layers of a Llama stage holding `layers` (global indices,
    named by their local index), in the order Megatron's state dict holds them."""
    out = []
    for j, _ in enumerate(layers):
        m = f"decoder.layers.{j}."
        out += [m + "self_attention.linear_qkv.layer_norm_weight", m + "self_attention.linear_qkv.weight",
                m + "self_attention.linear_proj.weight", m + "mlp.linear_fc1.layer_norm_weight",
                m + "mlp.linear_fc1.weight", m + "mlp.linear_fc2.weight"]
    return out


def test_megatron_tp2_llama(llama):
    """TP 2 of a GQA Llama: fused QKV one query group per rank, gated fc1 [gate_r; up_r], linear_proj
    and fc2 as strided column blocks, vocab 14 padded to 16 (make_vocab_size_divisible_by 4 x tp 2)
    by repeating row 13, norms whole on both ranks."""
    p = plan(llama.dir, "megatron", tp=2, vocab_divisible_by=4)
    files = by_path(p)
    assert sorted(files) == ["latest_checkpointed_iteration.txt", "release/mp_rank_00/model_optim_rng.pt",
                             "release/mp_rank_01/model_optim_rng.pt", "tokenizer.json"]
    assert files["latest_checkpointed_iteration.txt"].literals == ((0, b"release"),)
    tok = files["tokenizer.json"]
    assert tok.kind == "copy" and tok.size == len(TOKENIZER)
    assert copies(tok.tensors[0]) == [(str(llama.dir / "tokenizer.json"), 0, 1, "U8", len(TOKENIZER), 1, 0, 0, False)]

    E, Q, K, V = "model.embed_tokens.weight", "model.layers.2.self_attn.q_proj.weight", \
        "model.layers.2.self_attn.k_proj.weight", "model.layers.2.self_attn.v_proj.weight"
    O, G, U, D = "model.layers.2.self_attn.o_proj.weight", "model.layers.2.mlp.gate_proj.weight", \
        "model.layers.2.mlp.up_proj.weight", "model.layers.2.mlp.down_proj.weight"
    m = "decoder.layers.2."
    for r in (0, 1):
        f = files[f"release/mp_rank_0{r}/model_optim_rng.pt"]
        obj = check_archive(f)
        assert obj["checkpoint_version"] == 3.0
        args = obj["args"]
        assert (args.tensor_model_parallel_size, args.padded_vocab_size, args.vocab_size) == (2, 16, 14)
        assert (args.num_query_groups, args.kv_channels, args.ffn_hidden_size) == (2, 3, 16)
        names = (["embedding.word_embeddings.weight"] + llama_megatron_names(range(4))
                 + ["decoder.final_layernorm.weight", "output_layer.weight"])
        assert [t.name for t in f.tensors] == names
        t = tensors_of(f)
        assert shapes(f)[:7] == [
            ("embedding.word_embeddings.weight", "F32", (8, 8)),  # 16 padded rows / 2
            ("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight", "F32", (8,)),
            ("decoder.layers.0.self_attention.linear_qkv.weight", "F32", (12, 8)),  # (2 q + k + v heads) * 3
            ("decoder.layers.0.self_attention.linear_proj.weight", "F32", (8, 6)),  # 12 / 2 columns
            ("decoder.layers.0.mlp.linear_fc1.layer_norm_weight", "F32", (8,)),
            ("decoder.layers.0.mlp.linear_fc1.weight", "F32", (16, 8)),  # 8 gate + 8 up rows
            ("decoder.layers.0.mlp.linear_fc2.weight", "F32", (8, 8)),  # 16 / 2 columns
        ]
        # Query group r: q heads 2r, 2r+1 (rows 6r..6r+5), then k head r, v head r (rows 3r..3r+2).
        assert copies(t[m + "self_attention.linear_qkv.weight"]) == [
            blk(llama, Q, 6 * r, 0, 6, 8, 0), blk(llama, K, 3 * r, 0, 3, 8, 6), blk(llama, V, 3 * r, 0, 3, 8, 9)]
        # o_proj [8, 12]: columns 6r..6r+5 of every row, 48 bytes apart.
        assert copies(t[m + "self_attention.linear_proj.weight"]) == [blk(llama, O, 0, 6 * r, 8, 6, stride=48)]
        assert copies(t[m + "mlp.linear_fc1.weight"]) == [blk(llama, G, 8 * r, 0, 8, 8, 0),
                                                          blk(llama, U, 8 * r, 0, 8, 8, 8)]
        assert copies(t[m + "mlp.linear_fc2.weight"]) == [blk(llama, D, 0, 8 * r, 8, 8, stride=64)]
        # A vector is an [n, 1] view: 8 rows of one element, 4 bytes apart.
        assert copies(t[m + "self_attention.linear_qkv.layer_norm_weight"]) == [
            blk(llama, "model.layers.2.input_layernorm.weight", 0, 0, 8, 1)]
        assert copies(t[m + "mlp.linear_fc1.layer_norm_weight"]) == [
            blk(llama, "model.layers.2.post_attention_layernorm.weight", 0, 0, 8, 1)]
        assert copies(t["decoder.final_layernorm.weight"]) == [blk(llama, "model.norm.weight", 0, 0, 8, 1)]
    t0 = tensors_of(files["release/mp_rank_00/model_optim_rng.pt"])
    t1 = tensors_of(files["release/mp_rank_01/model_optim_rng.pt"])
    for name, hf in (("embedding.word_embeddings.weight", E), ("output_layer.weight", "lm_head.weight")):
        assert copies(t0[name]) == [blk(llama, hf, 0, 0, 8, 8)]
        # rows 8..13, then padding rows 14, 15 = row 13 again
        assert copies(t1[name]) == [blk(llama, hf, 8, 0, 6, 8), repeat_row(llama, hf, 13, 2, 8, 6)]
    # The same in absolute bytes: the data section starts at 4096, the embedding [14, 8] takes 448
    # bytes, a layer (8 + 96 + 48 + 48 + 96 + 8 + 128 + 128 + 128) * 4 = 2752, and q_proj follows
    # layer 2's input norm (32 bytes): 4096 + 448 + 2 * 2752 + 32 = 10080; rank 1 starts 6 rows in.
    assert llama.at(Q) == 10080
    assert copies(t1[m + "self_attention.linear_qkv.weight"])[0][:3] == (llama.file, 10080 + 6 * 32, 32)


def test_megatron_tp4_above_kv_heads_splits_fused_rows_by_count(llama):
    """TP 4 with 2 KV heads: the 24 fused QKV rows [q 0-5 | k 0-2 | v 0-2 | q 6-11 | k 3-5 | v 3-5]
    are cut into four runs of 6 raw rows, not at head boundaries: ranks 1 and 3 hold a k and a v
    head and no query."""
    files = by_path(plan(llama.dir, "megatron", tp=4, vocab_divisible_by=4))
    Q, K, V = (f"model.layers.1.self_attn.{x}_proj.weight" for x in "qkv")
    expected_qkv = {
        0: [blk(llama, Q, 0, 0, 6, 8, 0)],
        1: [blk(llama, K, 0, 0, 3, 8, 0), blk(llama, V, 0, 0, 3, 8, 3)],
        2: [blk(llama, Q, 6, 0, 6, 8, 0)],
        3: [blk(llama, K, 3, 0, 3, 8, 0), blk(llama, V, 3, 0, 3, 8, 3)],
    }
    E = "model.embed_tokens.weight"
    # 14 rows padded to 16 (4 x tp 4): 4 rows a rank, rank 3 rows 12, 13 and row 13 twice more.
    expected_embedding = {0: [blk(llama, E, 0, 0, 4, 8)], 1: [blk(llama, E, 4, 0, 4, 8)],
                          2: [blk(llama, E, 8, 0, 4, 8)],
                          3: [blk(llama, E, 12, 0, 2, 8), repeat_row(llama, E, 13, 2, 8, 2)]}
    assert sorted(f for f in files if f.endswith(".pt")) == [f"release/mp_rank_0{r}/model_optim_rng.pt"
                                                             for r in range(4)]
    for r in range(4):
        f = files[f"release/mp_rank_0{r}/model_optim_rng.pt"]
        check_archive(f)
        t = tensors_of(f)
        m = "decoder.layers.1."
        assert t[m + "self_attention.linear_qkv.weight"].shape == (6, 8)
        assert copies(t[m + "self_attention.linear_qkv.weight"]) == expected_qkv[r]
        assert copies(t[m + "self_attention.linear_proj.weight"]) == [
            blk(llama, "model.layers.1.self_attn.o_proj.weight", 0, 3 * r, 8, 3)]
        assert copies(t[m + "mlp.linear_fc1.weight"]) == [
            blk(llama, "model.layers.1.mlp.gate_proj.weight", 4 * r, 0, 4, 8, 0),
            blk(llama, "model.layers.1.mlp.up_proj.weight", 4 * r, 0, 4, 8, 4)]
        assert copies(t[m + "mlp.linear_fc2.weight"]) == [
            blk(llama, "model.layers.1.mlp.down_proj.weight", 0, 4 * r, 8, 4)]
        assert copies(t["embedding.word_embeddings.weight"]) == expected_embedding[r]
        assert t["embedding.word_embeddings.weight"].shape == (4, 8)


def llama_fused_qkv_tp1(src: Source, layer: int) -> list[Copy]:
    """The whole fused QKV of a layer (TP 1): per query group g, q heads 2g, 2g+1, k_g, v_g."""
    Q, K, V = (f"model.layers.{layer}.self_attn.{x}_proj.weight" for x in "qkv")
    return [blk(src, Q, 0, 0, 6, 8, 0), blk(src, K, 0, 0, 3, 8, 6), blk(src, V, 0, 0, 3, 8, 9),
            blk(src, Q, 6, 0, 6, 8, 12), blk(src, K, 3, 0, 3, 8, 18), blk(src, V, 3, 0, 3, 8, 21)]


def test_megatron_pp2_places_layers_embedding_and_head(llama):
    """PP 2 of 4 layers: layers 0, 1 on stage 0 with the embedding, layers 2, 3 on stage 1 as its
    local layers 0, 1 with the final norm and the output layer; then an uneven first stage of 1."""
    files = by_path(plan(llama.dir, "megatron", pp=2, vocab_divisible_by=4))
    assert sorted(f for f in files if f.endswith(".pt")) == ["release/mp_rank_00_000/model_optim_rng.pt",
                                                             "release/mp_rank_00_001/model_optim_rng.pt"]
    first, last = files["release/mp_rank_00_000/model_optim_rng.pt"], files["release/mp_rank_00_001/model_optim_rng.pt"]
    assert [t.name for t in first.tensors] == ["embedding.word_embeddings.weight"] + llama_megatron_names([0, 1])
    assert [t.name for t in last.tensors] == (llama_megatron_names([2, 3])
                                              + ["decoder.final_layernorm.weight", "output_layer.weight"])
    for f in (first, last):
        assert check_archive(f)["args"].pipeline_model_parallel_size == 2
    t0, t1 = tensors_of(first), tensors_of(last)
    assert t0["decoder.layers.1.self_attention.linear_qkv.weight"].shape == (24, 8)
    assert copies(t0["decoder.layers.1.self_attention.linear_qkv.weight"]) == llama_fused_qkv_tp1(llama, 1)
    assert copies(t1["decoder.layers.0.self_attention.linear_qkv.weight"]) == llama_fused_qkv_tp1(llama, 2)
    assert copies(t1["decoder.layers.1.mlp.linear_fc2.weight"]) == [
        blk(llama, "model.layers.3.mlp.down_proj.weight", 0, 0, 8, 16)]
    assert copies(t1["decoder.layers.1.mlp.linear_fc1.weight"]) == [
        blk(llama, "model.layers.3.mlp.gate_proj.weight", 0, 0, 16, 8, 0),
        blk(llama, "model.layers.3.mlp.up_proj.weight", 0, 0, 16, 8, 16)]
    # TP 1, vocab 14 padded to 16: all rows, then row 13 twice.
    assert t0["embedding.word_embeddings.weight"].shape == (16, 8)
    assert copies(t0["embedding.word_embeddings.weight"]) == [
        blk(llama, "model.embed_tokens.weight", 0, 0, 14, 8), repeat_row(llama, "model.embed_tokens.weight", 13, 2, 8, 14)]
    assert copies(t1["output_layer.weight"]) == [
        blk(llama, "lm_head.weight", 0, 0, 14, 8), repeat_row(llama, "lm_head.weight", 13, 2, 8, 14)]

    uneven = by_path(plan(llama.dir, "megatron", pp=2, first_stage_layers=1, vocab_divisible_by=4))
    first, last = uneven["release/mp_rank_00_000/model_optim_rng.pt"], uneven["release/mp_rank_00_001/model_optim_rng.pt"]
    assert [t.name for t in first.tensors] == ["embedding.word_embeddings.weight"] + llama_megatron_names([0])
    assert [t.name for t in last.tensors] == (llama_megatron_names([1, 2, 3])
                                              + ["decoder.final_layernorm.weight", "output_layer.weight"])
    assert copies(tensors_of(last)["decoder.layers.0.self_attention.linear_qkv.weight"]) == llama_fused_qkv_tp1(llama, 1)
    assert check_archive(first)["args"].decoder_first_pipeline_num_layers == 1


def test_megatron_vpp2_model_chunks(llama):
    """PP 2 x VPP 2 of 4 layers: model chunk k = v * pp + p holds layer k, so pipeline rank 0's file
    has model0 = [embedding, layer 0] and model1 = [layer 2]; rank 1's model0 = [layer 1] and
    model1 = [layer 3, final norm, output layer]; each layer is local layer 0 of its chunk."""
    files = by_path(plan(llama.dir, "megatron", pp=2, vpp=2, vocab_divisible_by=4))
    rank0, rank1 = files["release/mp_rank_00_000/model_optim_rng.pt"], files["release/mp_rank_00_001/model_optim_rng.pt"]
    obj0 = check_archive(rank0, chunks=("model0", "model1"))
    obj1 = check_archive(rank1, chunks=("model0", "model1"))
    assert "model" not in obj0 and "model2" not in obj0
    assert list(obj0["model0"]) == ["embedding.word_embeddings.weight"] + llama_megatron_names([0])
    assert list(obj0["model1"]) == llama_megatron_names([2])
    assert list(obj1["model0"]) == llama_megatron_names([1])
    assert list(obj1["model1"]) == llama_megatron_names([3]) + ["decoder.final_layernorm.weight", "output_layer.weight"]
    assert obj0["args"].virtual_pipeline_model_parallel_size == 2
    # The plan lists the tensors of model0, then model1: the same name twice in one file.
    qkv = [t for t in rank0.tensors if t.name == "decoder.layers.0.self_attention.linear_qkv.weight"]
    assert [copies(t) for t in qkv] == [llama_fused_qkv_tp1(llama, 0), llama_fused_qkv_tp1(llama, 2)]
    qkv = [t for t in rank1.tensors if t.name == "decoder.layers.0.self_attention.linear_qkv.weight"]
    assert [copies(t) for t in qkv] == [llama_fused_qkv_tp1(llama, 1), llama_fused_qkv_tp1(llama, 3)]
    norms = [t for t in rank1.tensors if t.name == "decoder.layers.0.mlp.linear_fc1.layer_norm_weight"]
    assert [copies(t) for t in norms] == [[blk(llama, "model.layers.1.post_attention_layernorm.weight", 0, 0, 8, 1)],
                                          [blk(llama, "model.layers.3.post_attention_layernorm.weight", 0, 0, 8, 1)]]


def mixtral_source(root: Path) -> Source:
    """Mixtral: hidden 8, 4 heads of 2, 2 KV heads, 4 experts of ffn 6, 2 layers, vocab 16."""
    config = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 8,
              "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 6, "vocab_size": 16,
              "num_hidden_layers": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
              "max_position_embeddings": 32, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
              "hidden_act": "silu", "dtype": "float32"}
    tensors = [("model.embed_tokens.weight", [16, 8])]
    for i in range(2):
        p = f"model.layers.{i}."
        tensors += [(p + "input_layernorm.weight", [8]), (p + "self_attn.q_proj.weight", [8, 8]),
                    (p + "self_attn.k_proj.weight", [4, 8]), (p + "self_attn.v_proj.weight", [4, 8]),
                    (p + "self_attn.o_proj.weight", [8, 8]), (p + "post_attention_layernorm.weight", [8]),
                    (p + "block_sparse_moe.gate.weight", [4, 8])]
        for e in range(4):
            x = f"{p}block_sparse_moe.experts.{e}."
            tensors += [(x + "w1.weight", [6, 8]), (x + "w2.weight", [8, 6]), (x + "w3.weight", [6, 8])]
    tensors += [("model.norm.weight", [8]), ("lm_head.weight", [16, 8])]
    return make_hf(root, config, tensors)


def test_megatron_experts_by_ep_rank(tmp_path):
    """4 experts over EP 2: expert e on EP rank e // 2 as local expert e % 2, its fc1 [w1; w3] and
    fc2 w2 whole (TP 1); then TP 2 x EP 2, where each expert is also cut like a dense MLP, and
    TP 2 x EP 2 with expert-TP 1, where only two ranks save (Megatron's expert_grid)."""
    src = mixtral_source(tmp_path / "mixtral")
    x = "model.layers.1.block_sparse_moe."
    local = "decoder.layers.1.mlp.experts.local_experts."

    files = by_path(plan(src.dir, "megatron", ep=2))
    assert sorted(f for f in files if f.endswith(".pt")) == ["release/mp_rank_00_000/model_optim_rng.pt",
                                                             "release/mp_rank_00_001/model_optim_rng.pt"]
    for ep_rank in (0, 1):
        f = files[f"release/mp_rank_00_00{ep_rank}/model_optim_rng.pt"]
        obj = check_archive(f)
        assert (obj["args"].expert_model_parallel_size, obj["args"].num_experts) == (2, 4)
        t = tensors_of(f)
        layer = [n for n in t if n.startswith("decoder.layers.1.")]
        assert layer == ["decoder.layers.1.self_attention.linear_qkv.layer_norm_weight",
                         "decoder.layers.1.self_attention.linear_qkv.weight",
                         "decoder.layers.1.self_attention.linear_proj.weight",
                         "decoder.layers.1.pre_mlp_layernorm.weight", "decoder.layers.1.mlp.router.weight",
                         local + "0.linear_fc1.weight", local + "1.linear_fc1.weight",
                         local + "0.linear_fc2.weight", local + "1.linear_fc2.weight"]
        assert copies(t["decoder.layers.1.mlp.router.weight"]) == [blk(src, x + "gate.weight", 0, 0, 4, 8)]
        for j in (0, 1):
            e = 2 * ep_rank + j
            assert t[local + f"{j}.linear_fc1.weight"].shape == (12, 8)
            assert copies(t[local + f"{j}.linear_fc1.weight"]) == [
                blk(src, x + f"experts.{e}.w1.weight", 0, 0, 6, 8, 0),
                blk(src, x + f"experts.{e}.w3.weight", 0, 0, 6, 8, 6)]
            assert copies(t[local + f"{j}.linear_fc2.weight"]) == [blk(src, x + f"experts.{e}.w2.weight", 0, 0, 8, 6)]

    # TP 2 x EP 2 (expert TP = TP): rank files (tp, ep) = 00_000, 01_000, 00_001, 01_001.
    files = by_path(plan(src.dir, "megatron", tp=2, ep=2))
    assert sorted(f for f in files if f.endswith(".pt")) == [
        f"release/mp_rank_{t:02d}_{e:03d}/model_optim_rng.pt" for t in (0, 1) for e in (0, 1)]
    f = files["release/mp_rank_01_001/model_optim_rng.pt"]  # TP rank 1 of experts 2, 3
    check_archive(f)
    t = tensors_of(f)
    assert copies(t[local + "1.linear_fc1.weight"]) == [blk(src, x + "experts.3.w1.weight", 3, 0, 3, 8, 0),
                                                        blk(src, x + "experts.3.w3.weight", 3, 0, 3, 8, 3)]
    assert copies(t[local + "1.linear_fc2.weight"]) == [blk(src, x + "experts.3.w2.weight", 0, 3, 8, 3)]
    # Dense tensors of TP rank 1: query group 1 = q heads 2, 3 (rows 4..7), k and v head 1.
    assert copies(t["decoder.layers.1.self_attention.linear_qkv.weight"]) == [
        blk(src, "model.layers.1.self_attn.q_proj.weight", 4, 0, 4, 8, 0),
        blk(src, "model.layers.1.self_attn.k_proj.weight", 2, 0, 2, 8, 4),
        blk(src, "model.layers.1.self_attn.v_proj.weight", 2, 0, 2, 8, 6)]

    # TP 2 x EP 2 x expert-TP 1: ranks s < etp * ep = 2 save, s = (TP s % 2, EP s // 1 % 2).
    files = by_path(plan(src.dir, "megatron", tp=2, ep=2, etp=1))
    assert sorted(f for f in files if f.endswith(".pt")) == ["release/mp_rank_00_000/model_optim_rng.pt",
                                                             "release/mp_rank_01_001/model_optim_rng.pt"]
    f = files["release/mp_rank_01_001/model_optim_rng.pt"]
    check_archive(f)
    t = tensors_of(f)
    assert copies(t[local + "0.linear_fc1.weight"]) == [blk(src, x + "experts.2.w1.weight", 0, 0, 6, 8, 0),
                                                        blk(src, x + "experts.2.w3.weight", 0, 0, 6, 8, 6)]
    assert copies(t["decoder.layers.1.self_attention.linear_proj.weight"]) == [
        blk(src, "model.layers.1.self_attn.o_proj.weight", 0, 4, 8, 4)]


# ---- HF -> torch_dist and NeMo 2 (PyTorch DCP) ---------------------------------------------------

def dcp_chunks(files: dict, directory: str):
    """The DCP .metadata a plan writes, read by torch's own unpickler, and for each (key, chunk
    offsets): the tensor a data file's item (a torch.save archive) holds, where its bytes lie."""
    import torch  # noqa: F401  (the metadata pickle names torch.distributed.checkpoint classes)

    (meta,) = [data for _, data in files[f"{directory}/.metadata"].literals]
    md = pickle.loads(meta)
    data_files = {}
    items = {}
    for index, info in md.storage_data.items():
        path = f"{directory}/{info.relative_path}"
        if path not in data_files:
            data_files[path] = image(files[path])
        archive = data_files[path][info.offset:info.offset + info.length]
        chunk = None if index.offset is None else tuple(index.offset)  # None: a bytes item (extra state)
        items[(index.fqn, chunk)] = (path, torch_archive(archive, base=info.offset))
    return md, items


def test_torch_dist_llama(llama):
    """torch_dist: every key a global TP-1 tensor, layers stacked on a leading axis, one chunk (a
    torch.save archive inside __0_0.distcp) per layer; --tp 2 only sets the vocab padding."""
    files = by_path(plan(llama.dir, "torch_dist", tp=2, vocab_divisible_by=4))
    assert sorted(files) == ["latest_checkpointed_iteration.txt", "release/.metadata", "release/__0_0.distcp",
                             "release/common.pt", "release/metadata.json", "tokenizer.json"]
    assert json.loads(files["release/metadata.json"].literals[0][1]) == {
        "sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
        "common_backend_version": 1}
    md, items = dcp_chunks(files, "release")
    qkv = md.state_dict_metadata["decoder.layers.self_attention.linear_qkv.weight"]
    assert tuple(qkv.size) == (4, 24, 8)
    assert [(tuple(c.offsets), tuple(c.sizes)) for c in qkv.chunks] == [((l, 0, 0), (1, 24, 8)) for l in range(4)]
    fc1 = md.state_dict_metadata["decoder.layers.mlp.linear_fc1.weight"]
    assert tuple(fc1.size) == (4, 32, 8)
    emb = md.state_dict_metadata["embedding.word_embeddings.weight"]
    assert tuple(emb.size) == (16, 8)  # 14 padded to a multiple of 4 x tp 2
    assert [(tuple(c.offsets), tuple(c.sizes)) for c in emb.chunks] == [((0, 0), (16, 8))]
    assert "output_layer.weight" in md.state_dict_metadata

    planned = tensors_of(files["release/__0_0.distcp"])
    # (key, chunk offsets): (the plan's label, the chunk's shape in its archive, the copies).
    expected = {
        ("decoder.layers.self_attention.linear_qkv.weight", (2, 0, 0)): (
            "decoder.layers.self_attention.linear_qkv.weight[2]", (1, 24, 8), llama_fused_qkv_tp1(llama, 2)),
        ("decoder.layers.mlp.linear_fc1.weight", (3, 0, 0)): (
            "decoder.layers.mlp.linear_fc1.weight[3]", (1, 32, 8),
            [blk(llama, "model.layers.3.mlp.gate_proj.weight", 0, 0, 16, 8, 0),
             blk(llama, "model.layers.3.mlp.up_proj.weight", 0, 0, 16, 8, 16)]),
        ("decoder.layers.self_attention.linear_proj.weight", (1, 0, 0)): (
            "decoder.layers.self_attention.linear_proj.weight[1]", (1, 8, 12),
            [blk(llama, "model.layers.1.self_attn.o_proj.weight", 0, 0, 8, 12)]),
        ("decoder.layers.mlp.linear_fc1.layer_norm_weight", (0, 0)): (
            "decoder.layers.mlp.linear_fc1.layer_norm_weight[0]", (1, 8),
            [blk(llama, "model.layers.0.post_attention_layernorm.weight", 0, 0, 8, 1)]),
        ("embedding.word_embeddings.weight", (0, 0)): (
            "embedding.word_embeddings.weight", (16, 8),
            [blk(llama, "model.embed_tokens.weight", 0, 0, 14, 8),
             repeat_row(llama, "model.embed_tokens.weight", 13, 2, 8, 14)]),
    }
    for (key, offsets), (label, chunk_shape, want) in expected.items():
        path, stored = items[(key, offsets)]
        t = planned[label]
        # The plan fills the storage of the chunk's archive: same place, dtype and element count.
        assert path == "release/__0_0.distcp"
        assert (stored.dtype, stored.shape, stored.offset) == ("F32", chunk_shape, t.offset), key
        assert t.shape == chunk_shape[-len(t.shape):]
        assert copies(t) == want, key
    # Every planned chunk is exactly one DCP item's storage, and every item is planned.
    assert sorted(s.offset for _, s in items.values() if isinstance(s, Stored)) == \
        sorted(t.offset for t in planned.values())


def test_nemo_llama(llama):
    """NeMo 2: the same DCP layout under weights/ with NeMo's 'module.' prefix and no vocabulary
    padding (NeMo's importer keeps vocab 14), plus context/ with the tokenizer and config."""
    files = by_path(plan(llama.dir, "nemo"))
    assert sorted(files) == ["context/io.json", "context/model.yaml", "context/nemo_tokenizer/config.json",
                             "context/nemo_tokenizer/tokenizer.json", "weights/.metadata", "weights/__0_0.distcp",
                             "weights/common.pt", "weights/metadata.json"]
    assert copies(files["context/nemo_tokenizer/tokenizer.json"].tensors[0]) == [
        (str(llama.dir / "tokenizer.json"), 0, 1, "U8", len(TOKENIZER), 1, 0, 0, False)]
    md, items = dcp_chunks(files, "weights")
    assert all(key.startswith("module.") for key in md.state_dict_metadata)
    emb = md.state_dict_metadata["module.embedding.word_embeddings.weight"]
    assert tuple(emb.size) == (14, 8)
    planned = tensors_of(files["weights/__0_0.distcp"])
    t = planned["module.embedding.word_embeddings.weight"]
    assert items[("module.embedding.word_embeddings.weight", (0, 0))][1].offset == t.offset
    assert copies(t) == [blk(llama, "model.embed_tokens.weight", 0, 0, 14, 8)]
    t = planned["module.decoder.layers.self_attention.linear_qkv.weight[3]"]
    assert items[("module.decoder.layers.self_attention.linear_qkv.weight", (3, 0, 0))][1].offset == t.offset
    assert copies(t) == llama_fused_qkv_tp1(llama, 3)
    t = planned["module.decoder.layers.mlp.linear_fc2.weight[0]"]
    assert copies(t) == [blk(llama, "model.layers.0.mlp.down_proj.weight", 0, 0, 8, 16)]
    config = json.loads(files["context/nemo_tokenizer/config.json"].literals[0][1])
    assert (config["vocab_size"], config["head_dim"]) == (14, 3)


# ---- Megatron -> Megatron and Megatron -> HF (inverse plans from real rank files) ---------------

@dataclass
class RankFile:
    """A Megatron rank file on disk as this test reads it: its path and its state dict."""

    path: str
    model: dict

    def blk(self, name: str, row: int, col: int, rows: int, cols: int, dst_row: int = 0, dst_col: int = 0,
            *, stride: int | None = None) -> Copy:
        stored = self.model[name]
        return (self.path, stored.at(row, col), view2d(stored.shape)[1] * F32 if stride is None else stride, "F32",
                rows, cols, dst_row, dst_col, False)


def rank_files(checkpoint: Path, tp: int) -> list[RankFile]:
    out = []
    for r in range(tp):
        path = (checkpoint / "release" / f"mp_rank_{r:02d}" / "model_optim_rng.pt").resolve()
        out.append(RankFile(str(path), torch_archive(path.read_bytes())["model"]))
    return out


def test_megatron_tp8_to_tp4(tmp_path):
    """TP 8 -> TP 4 of a Llama with 8 heads of 2 in 4 query groups (hidden 16, ffn 16, vocab 14):
    each TP-4 shard is read from TP-8 ranks 2r and 2r+1, which is which byte range of theirs."""
    src = llama_source(tmp_path / "wide", hidden=16, heads=8, kv=4, head_dim=2, ffn=16, vocab=14, layers=2)
    tp8 = rank_files(write(src.dir, tmp_path / "tp8", "megatron", tp=8, vocab_divisible_by=1), 8)
    m = "decoder.layers.1."
    qkv, proj, fc1, fc2 = (m + "self_attention.linear_qkv.weight", m + "self_attention.linear_proj.weight",
                           m + "mlp.linear_fc1.weight", m + "mlp.linear_fc2.weight")
    # The TP-8 shards, as the setup wrote them: 32 fused rows / 8; TP-8 rank 2g holds q heads
    # 2g, 2g+1 of query group g, rank 2g+1 its k and v heads.
    assert [f.model[qkv].shape for f in tp8] == [(4, 16)] * 8
    assert [f.model[proj].shape for f in tp8] == [(16, 2)] * 8
    assert [f.model["embedding.word_embeddings.weight"].shape for f in tp8] == [(2, 16)] * 8  # 14 padded to 16

    files = by_path(plan(tmp_path / "tp8", "megatron", tp=4, vocab_divisible_by=1))
    assert sorted(f for f in files if f.endswith(".pt")) == [f"release/mp_rank_0{r}/model_optim_rng.pt"
                                                             for r in range(4)]
    for r in range(4):
        f = files[f"release/mp_rank_0{r}/model_optim_rng.pt"]
        assert check_archive(f)["args"].tensor_model_parallel_size == 4
        t = tensors_of(f)
        a, b = tp8[2 * r], tp8[2 * r + 1]
        assert t[qkv].shape == (8, 16)
        # Query group r: its q heads (rank 2r's whole shard), k_r and v_r (rank 2r+1's rows 0-1, 2-3).
        assert copies(t[qkv]) == [a.blk(qkv, 0, 0, 4, 16, 0), b.blk(qkv, 0, 0, 2, 16, 4), b.blk(qkv, 2, 0, 2, 16, 6)]
        # Columns 4r..4r+3 of o_proj: rank 2r's two columns, then rank 2r+1's, every row 8 bytes apart.
        assert copies(t[proj]) == [a.blk(proj, 0, 0, 16, 2, 0, 0), b.blk(proj, 0, 0, 16, 2, 0, 2)]
        assert copies(t[fc2]) == [a.blk(fc2, 0, 0, 16, 2, 0, 0), b.blk(fc2, 0, 0, 16, 2, 0, 2)]
        # [gate 4r..4r+3; up 4r..4r+3] from ranks holding [gate 2s, 2s+1; up 2s, 2s+1].
        assert copies(t[fc1]) == [a.blk(fc1, 0, 0, 2, 16, 0), b.blk(fc1, 0, 0, 2, 16, 2),
                                  a.blk(fc1, 2, 0, 2, 16, 4), b.blk(fc1, 2, 0, 2, 16, 6)]
        # Norms are replicated: read from TP rank 0.
        assert copies(t[m + "mlp.linear_fc1.layer_norm_weight"]) == [
            tp8[0].blk(m + "mlp.linear_fc1.layer_norm_weight", 0, 0, 16, 1)]
    emb = "embedding.word_embeddings.weight"
    shard = {r: copies(tensors_of(files[f"release/mp_rank_0{r}/model_optim_rng.pt"])[emb]) for r in range(4)}
    assert shard[0] == [tp8[0].blk(emb, 0, 0, 2, 16, 0), tp8[1].blk(emb, 0, 0, 2, 16, 2)]
    # Rows 12, 13 (TP-8 rank 6); TP-8 rank 7 held only padding, which is not read: row 13 repeated.
    assert shard[3] == [tp8[6].blk(emb, 0, 0, 2, 16, 0), tp8[6].blk(emb, 1, 0, 2, 16, 2, stride=0)]


def test_megatron_tp2_to_hf(llama, tmp_path):
    """The inverse: HF tensors assembled from TP-2 rank files. q_proj is rows 0-5 (query group 0's
    q heads) of rank 0's fused QKV, then rows 0-5 of rank 1's; k and v their rows 6-8 and 9-11;
    the vocab padding is dropped. The output is one safetensors file laid out as save_file does."""
    tp2 = rank_files(write(llama.dir, tmp_path / "tp2", "megatron", tp=2, vocab_divisible_by=4), 2)
    files = by_path(plan(tmp_path / "tp2", "hf"))
    assert sorted(files) == ["config.json", "model.safetensors", "tokenizer.json"]
    t = check_safetensors_layout(files["model.safetensors"])
    assert {n: (x.dtype, x.shape) for n, x in t.items()} == {n: ("F32", s) for n, s in llama.shapes.items()}

    m, a, b = "decoder.layers.1.", tp2[0], tp2[1]
    qkv, proj, fc1 = m + "self_attention.linear_qkv.weight", m + "self_attention.linear_proj.weight", \
        m + "mlp.linear_fc1.weight"
    L = "model.layers.1."
    assert copies(t[L + "self_attn.q_proj.weight"]) == [a.blk(qkv, 0, 0, 6, 8, 0), b.blk(qkv, 0, 0, 6, 8, 6)]
    assert copies(t[L + "self_attn.k_proj.weight"]) == [a.blk(qkv, 6, 0, 3, 8, 0), b.blk(qkv, 6, 0, 3, 8, 3)]
    assert copies(t[L + "self_attn.v_proj.weight"]) == [a.blk(qkv, 9, 0, 3, 8, 0), b.blk(qkv, 9, 0, 3, 8, 3)]
    assert copies(t[L + "self_attn.o_proj.weight"]) == [a.blk(proj, 0, 0, 8, 6, 0, 0), b.blk(proj, 0, 0, 8, 6, 0, 6)]
    assert copies(t[L + "mlp.gate_proj.weight"]) == [a.blk(fc1, 0, 0, 8, 8, 0), b.blk(fc1, 0, 0, 8, 8, 8)]
    assert copies(t[L + "mlp.up_proj.weight"]) == [a.blk(fc1, 8, 0, 8, 8, 0), b.blk(fc1, 8, 0, 8, 8, 8)]
    emb = "embedding.word_embeddings.weight"
    assert copies(t["model.embed_tokens.weight"]) == [a.blk(emb, 0, 0, 8, 8, 0), b.blk(emb, 0, 0, 6, 8, 8)]
    assert copies(t["model.norm.weight"]) == [a.blk("decoder.final_layernorm.weight", 0, 0, 8, 1)]
    config = json.loads(files["config.json"].literals[0][1])
    assert (config["vocab_size"], config["num_key_value_heads"], config["head_dim"]) == (14, 2, 3)


# ---- HF -> DeepSeek-V3 inference layout -----------------------------------------------------------

def deepseek_source(root: Path) -> Source:
    """DeepSeek-V3: hidden 8, 2 heads (qk nope 2 + rope 2, v 2), q_lora 4, kv_lora 4, layer 0 dense
    (ffn 8), layer 1 MoE (4 routed experts of ffn 2 and a shared one), vocab 16, and one
    multi-token-prediction layer (layer 2) that the inference layout drops."""
    config = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 8,
              "num_attention_heads": 2, "num_key_value_heads": 2, "q_lora_rank": 4, "kv_lora_rank": 4,
              "qk_nope_head_dim": 2, "qk_rope_head_dim": 2, "v_head_dim": 2, "intermediate_size": 8,
              "moe_intermediate_size": 2, "n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2,
              "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1, "num_hidden_layers": 2,
              "num_nextn_predict_layers": 1, "vocab_size": 16, "max_position_embeddings": 32,
              "rope_interleave": True, "tie_word_embeddings": False, "dtype": "float32"}
    tensors = [("model.embed_tokens.weight", [16, 8])]
    for i in range(2):
        p = f"model.layers.{i}."
        tensors += [(p + "input_layernorm.weight", [8]), (p + "self_attn.q_a_proj.weight", [4, 8]),
                    (p + "self_attn.q_a_layernorm.weight", [4]), (p + "self_attn.q_b_proj.weight", [8, 4]),
                    (p + "self_attn.kv_a_proj_with_mqa.weight", [6, 8]), (p + "self_attn.kv_a_layernorm.weight", [4]),
                    (p + "self_attn.kv_b_proj.weight", [8, 4]), (p + "self_attn.o_proj.weight", [8, 4]),
                    (p + "post_attention_layernorm.weight", [8])]
    tensors += [("model.layers.0.mlp.gate_proj.weight", [8, 8]), ("model.layers.0.mlp.up_proj.weight", [8, 8]),
                ("model.layers.0.mlp.down_proj.weight", [8, 8]),
                ("model.layers.1.mlp.gate.weight", [4, 8]), ("model.layers.1.mlp.gate.e_score_correction_bias", [4])]
    for e in range(4):
        x = f"model.layers.1.mlp.experts.{e}."
        tensors += [(x + "gate_proj.weight", [2, 8]), (x + "up_proj.weight", [2, 8]), (x + "down_proj.weight", [8, 2])]
    x = "model.layers.1.mlp.shared_experts."
    tensors += [(x + "gate_proj.weight", [2, 8]), (x + "up_proj.weight", [2, 8]), (x + "down_proj.weight", [8, 2]),
                ("model.layers.2.enorm.weight", [8]), ("model.layers.2.hnorm.weight", [8]),
                ("model.layers.2.eh_proj.weight", [8, 16]),
                ("model.norm.weight", [8]), ("lm_head.weight", [16, 8])]
    return make_hf(root, config, tensors)


def test_deepseek_tp2(tmp_path):
    """DeepSeek's convert.py layout at mp 2: routed experts whole on rank e // 2 under their global
    index; dim-0 tensors (embed, wq_b, wkv_b, w1, w3, head) as row halves, dim-1 tensors (wo, w2) as
    strided column halves; the rest (norms, wq_a, wkv_a, router) whole on both; layer 2 (MTP) dropped."""
    src = deepseek_source(tmp_path / "dsv3")
    files = by_path(plan(src.dir, "deepseek", tp=2))
    assert sorted(files) == ["config.json", "model0-mp2.safetensors", "model1-mp2.safetensors", "tokenizer.json"]
    common = {"embed.weight": (8, 8), "norm.weight": (8,), "head.weight": (8, 8)}
    for i in (0, 1):
        common.update({f"layers.{i}.attn_norm.weight": (8,), f"layers.{i}.attn.wq_a.weight": (4, 8),
                       f"layers.{i}.attn.q_norm.weight": (4,), f"layers.{i}.attn.wq_b.weight": (4, 4),
                       f"layers.{i}.attn.wkv_a.weight": (6, 8), f"layers.{i}.attn.kv_norm.weight": (4,),
                       f"layers.{i}.attn.wkv_b.weight": (4, 4), f"layers.{i}.attn.wo.weight": (8, 2),
                       f"layers.{i}.ffn_norm.weight": (8,)})
    common.update({"layers.0.ffn.w1.weight": (4, 8), "layers.0.ffn.w3.weight": (4, 8), "layers.0.ffn.w2.weight": (8, 4),
                   "layers.1.ffn.gate.weight": (4, 8), "layers.1.ffn.gate.bias": (4,),
                   "layers.1.ffn.shared_experts.w1.weight": (1, 8), "layers.1.ffn.shared_experts.w3.weight": (1, 8),
                   "layers.1.ffn.shared_experts.w2.weight": (8, 1)})
    for rank in (0, 1):
        t = check_safetensors_layout(files[f"model{rank}-mp2.safetensors"])
        experts = {f"layers.1.ffn.experts.{e}.{w}.weight": (8, 2) if w == "w2" else (2, 8)
                   for e in (2 * rank, 2 * rank + 1) for w in ("w1", "w2", "w3")}
        assert {n: x.shape for n, x in t.items()} == {**common, **experts}
        h = 8 * rank  # first row of this rank's half of the vocabulary
        assert copies(t["embed.weight"]) == [blk(src, "model.embed_tokens.weight", h, 0, 8, 8)]
        assert copies(t["head.weight"]) == [blk(src, "lm_head.weight", h, 0, 8, 8)]
        A = "model.layers.1.self_attn."
        assert copies(t["layers.1.attn.wq_b.weight"]) == [blk(src, A + "q_b_proj.weight", 4 * rank, 0, 4, 4)]
        assert copies(t["layers.1.attn.wkv_b.weight"]) == [blk(src, A + "kv_b_proj.weight", 4 * rank, 0, 4, 4)]
        assert copies(t["layers.1.attn.wo.weight"]) == [blk(src, A + "o_proj.weight", 0, 2 * rank, 8, 2)]
        assert copies(t["layers.1.attn.wkv_a.weight"]) == [blk(src, A + "kv_a_proj_with_mqa.weight", 0, 0, 6, 8)]
        assert copies(t["layers.1.attn.kv_norm.weight"]) == [blk(src, A + "kv_a_layernorm.weight", 0, 0, 4, 1)]
        assert copies(t["layers.0.ffn.w2.weight"]) == [blk(src, "model.layers.0.mlp.down_proj.weight", 0, 4 * rank, 8, 4)]
        assert copies(t["layers.0.ffn.w3.weight"]) == [blk(src, "model.layers.0.mlp.up_proj.weight", 4 * rank, 0, 4, 8)]
        assert copies(t["layers.1.ffn.gate.bias"]) == [
            blk(src, "model.layers.1.mlp.gate.e_score_correction_bias", 0, 0, 4, 1)]
        S = "model.layers.1.mlp.shared_experts."
        assert copies(t["layers.1.ffn.shared_experts.w1.weight"]) == [blk(src, S + "gate_proj.weight", rank, 0, 1, 8)]
        assert copies(t["layers.1.ffn.shared_experts.w2.weight"]) == [blk(src, S + "down_proj.weight", 0, rank, 8, 1)]
        for e in (2 * rank, 2 * rank + 1):
            X = f"model.layers.1.mlp.experts.{e}."
            assert copies(t[f"layers.1.ffn.experts.{e}.w1.weight"]) == [blk(src, X + "gate_proj.weight", 0, 0, 2, 8)]
            assert copies(t[f"layers.1.ffn.experts.{e}.w2.weight"]) == [blk(src, X + "down_proj.weight", 0, 0, 8, 2)]


# ---- HF -> MindSpore Transformers ----------------------------------------------------------------

def test_mindspore_llama(llama):
    """MindFormers' mcore names at TP 1: the fused QKV per query group as Megatron fuses it, and
    linear_fc1 row-interleaved [g0; u0; g1; u1; ...]: an [ffn, 2 * hidden] view with gate_proj in
    the left half of every row and up_proj in the right; no vocab padding; local norm names."""
    files = by_path(plan(llama.dir, "mindspore"))
    assert sorted(files) == ["config.json", "model.safetensors", "tokenizer.json"]
    t = check_safetensors_layout(files["model.safetensors"])
    m = "decoder.layers.2."
    expected_names = {"embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight"}
    for i in range(4):
        expected_names |= {f"decoder.layers.{i}.{n}" for n in (
            "input_layernorm.weight", "self_attention.linear_qkv.weight", "self_attention.linear_proj.weight",
            "pre_mlp_layernorm.weight", "mlp.linear_fc1.weight", "mlp.linear_fc2.weight")}
    assert set(t) == expected_names
    fc1 = t[m + "mlp.linear_fc1.weight"]
    assert (fc1.shape, fc1.view2d) == ((32, 8), (16, 16))
    assert copies(fc1) == [blk(llama, "model.layers.2.mlp.gate_proj.weight", 0, 0, 16, 8, 0, 0),
                           blk(llama, "model.layers.2.mlp.up_proj.weight", 0, 0, 16, 8, 0, 8)]
    assert copies(t[m + "self_attention.linear_qkv.weight"]) == llama_fused_qkv_tp1(llama, 2)
    assert t["embedding.word_embeddings.weight"].shape == (14, 8)
    assert copies(t["embedding.word_embeddings.weight"]) == [blk(llama, "model.embed_tokens.weight", 0, 0, 14, 8)]
    assert copies(t[m + "pre_mlp_layernorm.weight"]) == [
        blk(llama, "model.layers.2.post_attention_layernorm.weight", 0, 0, 8, 1)]
    config = json.loads(files["config.json"].literals[0][1])
    assert config["use_interleaved_weight_layout_mlp"] is True


# ---- HF GPT-2 -> legacy Megatron-LM -------------------------------------------------------------

def gpt2_source(root: Path) -> Source:
    """GPT-2: n_embd 8, 2 heads of 4, ffn 32, 2 layers, vocab 14, 8 positions; Conv1D weights are
    stored [in, out]; lm_head is tied and not saved."""
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 8, "n_head": 2, "n_layer": 2,
              "n_positions": 8, "n_inner": None, "vocab_size": 14, "activation_function": "gelu_new",
              "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True, "dtype": "float32"}
    tensors = [("transformer.wte.weight", [14, 8]), ("transformer.wpe.weight", [8, 8])]
    for i in range(2):
        p = f"transformer.h.{i}."
        tensors += [(p + "ln_1.weight", [8]), (p + "ln_1.bias", [8]), (p + "attn.c_attn.weight", [8, 24]),
                    (p + "attn.c_attn.bias", [24]), (p + "attn.c_proj.weight", [8, 8]), (p + "attn.c_proj.bias", [8]),
                    (p + "ln_2.weight", [8]), (p + "ln_2.bias", [8]), (p + "mlp.c_fc.weight", [8, 32]),
                    (p + "mlp.c_fc.bias", [32]), (p + "mlp.c_proj.weight", [32, 8]), (p + "mlp.c_proj.bias", [8])]
    tensors += [("transformer.ln_f.weight", [8]), ("transformer.ln_f.bias", [8])]
    return make_hf(root, config, tensors)



def test_megatron_legacy_gpt2_tp2(tmp_path):
    """Legacy Megatron-LM GPT-2 at TP 2, checkpoint_version 3.0: query_key_value rows per head
    [q_h; k_h; v_h] ([np, 3, hn]), one head per rank; every Conv1D weight read transposed (HF
    column o of c_attn is Megatron row o); the vocab padded to 16 by repeating row 13; and at TP 1
    the two heads interleaved [q0 k0 v0 q1 k1 v1]."""
    src = gpt2_source(tmp_path / "gpt2")
    files = by_path(plan(src.dir, "megatron-legacy", tp=2, vocab_divisible_by=4))
    assert sorted(files) == ["latest_checkpointed_iteration.txt", "release/mp_rank_00/model_optim_rng.pt",
                             "release/mp_rank_01/model_optim_rng.pt", "tokenizer.json"]
    h = "transformer.h.1."
    for r in (0, 1):
        f = files[f"release/mp_rank_0{r}/model_optim_rng.pt"]
        obj = torch_archive(image(f))
        assert obj["checkpoint_version"] == 3.0
        assert (obj["args"].padded_vocab_size, obj["args"].orig_vocab_size) == (16, 14)
        stored = flatten_state_dict(obj["model"])
        assert list(stored) == [t.name for t in f.tensors]
        for t in f.tensors:
            assert (stored[t.name].dtype, stored[t.name].shape, stored[t.name].offset) == (t.dtype, t.shape, t.offset)
        t = tensors_of(f)
        L = "language_model.encoder.layers.1."
        assert [(n, x.shape) for n, x in t.items() if n.startswith(L)] == [
            (L + "input_layernorm.weight", (8,)), (L + "input_layernorm.bias", (8,)),
            (L + "self_attention.query_key_value.weight", (12, 8)), (L + "self_attention.query_key_value.bias", (12,)),
            (L + "self_attention.dense.weight", (8, 4)), (L + "self_attention.dense.bias", (8,)),
            (L + "post_attention_layernorm.weight", (8,)), (L + "post_attention_layernorm.bias", (8,)),
            (L + "mlp.dense_h_to_4h.weight", (16, 8)), (L + "mlp.dense_h_to_4h.bias", (16,)),
            (L + "mlp.dense_4h_to_h.weight", (8, 16)), (L + "mlp.dense_4h_to_h.bias", (8,))]
        assert "language_model.output_layer.weight" not in t and "word_embeddings_for_head.weight" not in t
        W = h + "attn.c_attn.weight"  # [in 8, out 24]: q = columns 0-7, k 8-15, v 16-23
        # Head r's rows of q, k, v are columns 4r.., 8+4r.., 16+4r.. of c_attn, read transposed:
        # a 4-row x 8-column destination block from 8 source rows of 4 columns, 96 bytes apart.
        assert copies(t[L + "self_attention.query_key_value.weight"]) == [
            blk(src, W, 0, 4 * r, 4, 8, 0, transpose=True), blk(src, W, 0, 8 + 4 * r, 4, 8, 4, transpose=True),
            blk(src, W, 0, 16 + 4 * r, 4, 8, 8, transpose=True)]
        B = h + "attn.c_attn.bias"
        assert copies(t[L + "self_attention.query_key_value.bias"]) == [
            blk(src, B, 4 * r, 0, 4, 1, 0), blk(src, B, 8 + 4 * r, 0, 4, 1, 4), blk(src, B, 16 + 4 * r, 0, 4, 1, 8)]
        # Row-parallel dense [out 8, in 8]: input features 4r.. are c_proj's source rows 4r..: contiguous.
        assert copies(t[L + "self_attention.dense.weight"]) == [
            blk(src, h + "attn.c_proj.weight", 4 * r, 0, 8, 4, transpose=True)]
        assert copies(t[L + "mlp.dense_h_to_4h.weight"]) == [
            blk(src, h + "mlp.c_fc.weight", 0, 16 * r, 16, 8, transpose=True)]
        assert copies(t[L + "mlp.dense_h_to_4h.bias"]) == [blk(src, h + "mlp.c_fc.bias", 16 * r, 0, 16, 1)]
        assert copies(t[L + "mlp.dense_4h_to_h.weight"]) == [
            blk(src, h + "mlp.c_proj.weight", 16 * r, 0, 8, 16, transpose=True)]
        assert copies(t["language_model.embedding.position_embeddings.weight"]) == [
            blk(src, "transformer.wpe.weight", 0, 0, 8, 8)]
    E = "language_model.embedding.word_embeddings.weight"
    assert copies(tensors_of(files["release/mp_rank_00/model_optim_rng.pt"])[E]) == [
        blk(src, "transformer.wte.weight", 0, 0, 8, 8)]
    assert copies(tensors_of(files["release/mp_rank_01/model_optim_rng.pt"])[E]) == [
        blk(src, "transformer.wte.weight", 8, 0, 6, 8), repeat_row(src, "transformer.wte.weight", 13, 2, 8, 6)]

    one = tensors_of(by_path(plan(src.dir, "megatron-legacy", vocab_divisible_by=4))["release/mp_rank_00/model_optim_rng.pt"])
    W = h + "attn.c_attn.weight"
    assert copies(one["language_model.encoder.layers.1.self_attention.query_key_value.weight"]) == [
        blk(src, W, 0, 0, 4, 8, 0, transpose=True), blk(src, W, 0, 8, 4, 8, 4, transpose=True),
        blk(src, W, 0, 16, 4, 8, 8, transpose=True), blk(src, W, 0, 4, 4, 8, 12, transpose=True),
        blk(src, W, 0, 12, 4, 8, 16, transpose=True), blk(src, W, 0, 20, 4, 8, 20, transpose=True)]
