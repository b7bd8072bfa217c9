"""Tensors as torch.save keeps them: views with any strides (transposed, permuted, column-major,
sliced with steps, expanded), storage offsets, several tensors on one storage, zero-size and
scalar tensors. pyconv reads them without torch and without copies in Python (a strided source
becomes block copies, or transposing copies), and each is equal to torch.load(...).contiguous():

- a matrix of views in an HF .bin (any names, no config) -> safetensors, cast or not, also
  through `pyconv verify` and pyconv.open().get();
- every container pyconv reads torch.save archives from (Megatron-Core .pt, legacy .pt / .zip /
  rank directories, NeMo 1 .nemo, DCP .distcp chunks): the same checkpoint with each tensor
  re-saved as a view converts to byte-identical output;
- a legacy Megatron GPT-2 whose linear weights are transposed views, as transformers' own
  conversion script writes them, converts to HF and gives the model's logits."""

from __future__ import annotations

import filecmp
import json
import os
import shutil

import pytest
import torch

import pyconv


def _random(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed + sum(shape) + len(shape))
    return (torch.randn(shape, generator=g) * 3).to(dtype)


def view_matrix() -> dict[str, torch.Tensor]:
    base, shared, grid = _random(6, 10), _random(40), _random(2, 3, 4, 5)
    return {
        "transposed": _random(8, 12).t(),
        "transposed_bf16": _random(16, 4, dtype=torch.bfloat16).t(),
        "column_major": _random(7, 5).t().contiguous().t(),
        "permuted_201": _random(3, 4, 5).permute(2, 0, 1),
        "permuted_102": _random(3, 4, 5).permute(1, 0, 2),
        "permuted_3102": grid.permute(3, 1, 0, 2),
        "permuted_5d": _random(2, 2, 2, 2, 3).permute(4, 2, 0, 3, 1),
        "step_rows": base[::2],
        "step_cols": base[:, 1::3],
        "step_both": base[1::2, ::3],
        "step_both_t": base[::2, 1::2].t(),
        "offset_rows": base[3:],
        "offset_block": base[1:5, 2:7],
        "vector_step": shared[3::4],
        "vector_offset": shared[5:17],
        "shared_a": shared[:20].view(4, 5),
        "shared_b": shared[20:].view(5, 4),
        "shared_t": shared[:20].view(4, 5).t(),
        "shared_overlap": shared.unfold(0, 5, 3),
        "expanded_rows": _random(1, 6).expand(5, 6),
        "expanded_cols": _random(5, 1).expand(5, 6),
        "expanded_scalar": _random().expand(3, 4),
        "scalar": _random(),
        "scalar_in_storage": shared[7],
        "zero_rows": _random(0, 5),
        "zero_cols_view": base[:, :0],
        "zero_transposed": _random(4, 0).t(),
        "diagonal": base[:, :6].diagonal(),
        "int64_transposed": torch.arange(24).view(4, 6).t(),
        "f16_step_both": _random(9, 8, dtype=torch.float16)[::3, ::2],
        "bool_transposed": (_random(3, 7) > 0).t(),
    }


def test_the_matrix_holds_what_it_claims():
    views = view_matrix()
    assert sum(not t.is_contiguous() for t in views.values()) >= 20
    storages = [t.untyped_storage().data_ptr() for t in views.values()]
    assert len(storages) - len(set(storages)) >= 5  # shared storages
    assert any(t.dim() == 0 for t in views.values()) and any(t.numel() == 0 for t in views.values())
    assert any(0 in t.stride() for t in views.values())  # expanded


def _load_safetensors(path):
    from safetensors.torch import load_file

    return load_file(path)


@pytest.mark.parametrize("dtype", [None, "fp32"])
def test_every_view_converts_equal_to_what_torch_load_gives(tmp_path, dtype):
    views = view_matrix()
    src = tmp_path / "bin"
    src.mkdir()
    torch.save(views, src / "pytorch_model.bin")
    pyconv.reshard(src, tmp_path / "out", to="hf", dtype=dtype)
    got = _load_safetensors(tmp_path / "out" / "model.safetensors")
    want = torch.load(src / "pytorch_model.bin", weights_only=True)
    assert set(got) == set(want)
    for name, tensor in want.items():
        expected = tensor.contiguous() if dtype is None or not tensor.is_floating_point() else tensor.float()
        assert got[name].dtype == expected.dtype and got[name].shape == expected.shape, name
        assert torch.equal(got[name], expected), name
    if dtype is None:
        assert pyconv.verify(src, tmp_path / "out").equal
        assert pyconv.verify(tmp_path / "out", src).equal


def test_every_view_reads_through_the_api(tmp_path):
    views = view_matrix()
    torch.save(views, tmp_path / "pytorch_model.bin")
    ckpt = pyconv.open(tmp_path)
    for name, tensor in views.items():
        assert torch.equal(ckpt.get(name), tensor), name


# ---- every container: the same checkpoint with its tensors re-saved as views ------------------

def as_view(t: torch.Tensor, k: int) -> torch.Tensor:
    """A view equal to t whose storage is laid out otherwise (k picks how)."""
    if t.dim() == 0 or t.numel() == 0:
        return t.clone()
    kind = k % 4
    if kind == 0:  # reversed dimension order in memory: column-major for a matrix
        order = tuple(range(t.dim() - 1, -1, -1))
        return t.permute(order).contiguous().permute(order)
    if kind == 1:  # at an offset inside a larger storage
        flat = torch.cat([torch.full((3,), 7, dtype=t.dtype), t.reshape(-1), torch.zeros(2, dtype=t.dtype)])
        return flat[3:3 + t.numel()].view(t.shape)
    if kind == 2:  # every other row of a storage twice as tall
        big = torch.zeros((2 * t.shape[0],) + t.shape[1:], dtype=t.dtype)
        big[1::2] = t
        return big[1::2]
    big = torch.zeros(t.shape[:-1] + (3 * t.shape[-1],), dtype=t.dtype)  # every third element of each row
    big[..., ::3] = t
    return big[..., ::3]


def viewify(tree, counter=None):
    """The tree with every tensor replaced by an equal view (cycling through as_view's kinds)."""
    counter = counter if counter is not None else [0]
    if isinstance(tree, torch.Tensor):
        counter[0] += 1
        out = as_view(tree, counter[0])
        assert torch.equal(out, tree)
        return out
    if isinstance(tree, dict):
        return type(tree)((k, viewify(v, counter)) for k, v in tree.items())
    if isinstance(tree, list):
        return [viewify(v, counter) for v in tree]
    return tree


def viewify_file(path):
    obj = torch.load(path, weights_only=False)
    torch.save(viewify(obj), path)


def _same_files(a, b):
    left = sorted(os.path.relpath(os.path.join(d, f), a) for d, _, fs in os.walk(a) for f in fs)
    right = sorted(os.path.relpath(os.path.join(d, f), b) for d, _, fs in os.walk(b) for f in fs)
    assert left == right
    _, mismatch, errors = filecmp.cmpfiles(a, b, left, shallow=False)
    assert not mismatch and not errors, (mismatch, errors)


def _converted_alike(plain, viewed, out, **target):
    pyconv.reshard(plain, out / "from_plain", **target)
    pyconv.reshard(viewed, out / "from_views", **target)
    _same_files(out / "from_plain", out / "from_views")


def _non_contiguous(path) -> int:
    from pyconv.io.torchzip import iter_tensors, read_torch_checkpoint

    return sum(ref.strides is not None for _, ref in iter_tensors(read_torch_checkpoint(path).obj))


@pytest.mark.parametrize("tp", [1, 2])
def test_megatron_core_pt_with_views(tiny_models, tmp_path, tp):
    plain = tmp_path / "plain"
    pyconv.reshard(tiny_models["llama"][1], plain, to="megatron", tp=tp)
    viewed = tmp_path / "viewed"
    shutil.copytree(plain, viewed)
    rank_files = [os.path.join(d, f) for d, _, fs in os.walk(viewed) for f in fs if f == "model_optim_rng.pt"]
    assert len(rank_files) == tp
    for f in rank_files:
        viewify_file(f)
        assert _non_contiguous(f) >= 10
    _converted_alike(plain, viewed, tmp_path, to="hf")
    _converted_alike(plain, viewed, tmp_path / "tp", to="megatron", tp=3 - tp)


@pytest.fixture(scope="module")
def legacy_gpt2():
    from test_legacy_megatron import tiny_gpt2

    return tiny_gpt2()


@pytest.mark.parametrize("container", ["pt", "zip", "dir"])
def test_legacy_megatron_with_views(legacy_gpt2, tmp_path, container):
    from test_legacy_megatron import legacy_rank_dicts, save_legacy

    tp, pp = (2, 2) if container == "dir" else (1, 1)
    ranks = legacy_rank_dicts(legacy_gpt2, "gpt2", tp, pp, 1.0)  # 1.0: q, k, v interleaved per row
    plain = save_legacy(ranks, tmp_path / "plain", container)
    viewed = save_legacy({rank: viewify(obj) for rank, obj in ranks.items()}, tmp_path / "viewed", container)
    _converted_alike(plain, viewed, tmp_path, to="hf")


def test_nemo1_archive_with_views(legacy_gpt2, tmp_path):
    from test_legacy_megatron import legacy_rank_dicts, nemo1_model_config, nemo1_state_dicts, save_nemo1

    states = nemo1_state_dicts(legacy_rank_dicts(legacy_gpt2, "gpt2", 1, 1, 3.0))
    config = nemo1_model_config("gpt2", 1, 1)
    plain = save_nemo1(states, config, tmp_path / "plain", "nemo")
    viewed = save_nemo1({rank: viewify(flat) for rank, flat in states.items()}, config, tmp_path / "viewed", "nemo")
    _converted_alike(plain, viewed, tmp_path, to="hf")


def test_dcp_chunks_with_views(tiny_models, tmp_path):
    import torch.distributed.checkpoint as dcp

    from pyconv.io.dcp import ChunkLocator, read_metadata

    plain = tmp_path / "plain"
    pyconv.reshard(tiny_models["llama"][1], plain, to="torch_dist")
    release = plain / "release"
    state = {k: torch.empty(t.size, dtype=torch.float32) for k, t in read_metadata(str(release)).tensors.items()}
    dcp.load(state, checkpoint_id=str(release))
    viewed = tmp_path / "viewed"
    (viewed / "release").mkdir(parents=True)
    for name in os.listdir(release):
        if name != ".metadata" and not name.endswith(".distcp"):
            shutil.copy(release / name, viewed / "release" / name)
    for name in os.listdir(plain):
        if name != "release":
            shutil.copy(plain / name, viewed / name)
    # DCP keeps a view's strides when its storage holds exactly its elements (the reversed
    # dimension order); views into larger storages it clones first.
    dcp.save({k: as_view(t, 0) for k, t in state.items()}, checkpoint_id=str(viewed / "release"))
    md = read_metadata(str(viewed / "release"))
    with ChunkLocator(md) as locator:
        strided = sum(locator.locate(tensor, chunk).strides is not None
                      for tensor in md.tensors.values() for chunk in tensor.chunks)
    assert strided >= 5
    _converted_alike(plain, viewed, tmp_path, to="hf")


# ---- what transformers' own Megatron GPT-2 script writes -------------------------------------

def test_legacy_gpt2_with_transposed_linear_weights_to_hf(legacy_gpt2, tmp_path):
    """transformers' checkpoint_reshaping_and_interoperability.py (4.46.3) stores Megatron's
    dense, dense_h_to_4h and dense_4h_to_h weights as `.transpose(0, 1)` of the HF Conv1D weights
    (shape [out, in], stride (1, out)); its Megatron -> HF direction writes c_proj / c_fc the same
    way into pytorch_model.bin. Both read, to the model's logits."""
    import transformers

    from test_legacy_megatron import _gpt2_logits, _load_hf, legacy_rank_dicts, save_legacy

    def transpose_linears(tree):
        for key, value in tree.items():
            if isinstance(value, dict):
                transpose_linears(value)
            elif key.endswith("weight") and value.dim() == 2 and "dense" in key:
                tree[key] = value.t().contiguous().transpose(0, 1)
        return tree

    ranks = {rank: transpose_linears(obj) for rank, obj in legacy_rank_dicts(legacy_gpt2, "gpt2", 1, 1, 3.0).items()}
    src = save_legacy(ranks, tmp_path / "megatron", "dir")
    rank_file = os.path.join(src, "release", "mp_rank_00", "model_optim_rng.pt")
    assert _non_contiguous(rank_file) == 3 * legacy_gpt2.config.n_layer
    pyconv.reshard(src, tmp_path / "hf", to="hf")
    assert torch.equal(_gpt2_logits(_load_hf(transformers.GPT2LMHeadModel, tmp_path / "hf")), _gpt2_logits(legacy_gpt2))

    # The HF side: c_attn, c_proj, c_fc as transposed views of [out, in] tensors, in a .bin.
    state = {k: (v.t().contiguous().t() if k.endswith(("c_proj.weight", "c_fc.weight", "c_attn.weight")) else v)
             for k, v in legacy_gpt2.state_dict().items()}
    (tmp_path / "bin").mkdir()
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    config = legacy_gpt2.config.to_dict()
    config["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "bin" / "config.json").write_text(json.dumps(config))
    assert _non_contiguous(tmp_path / "bin" / "pytorch_model.bin") == 4 * legacy_gpt2.config.n_layer
    pyconv.reshard(tmp_path / "bin", tmp_path / "megatron_from_bin", to="megatron", tp=2)
    pyconv.reshard(tmp_path / "megatron_from_bin", tmp_path / "hf_again", to="hf")
    again = _load_hf(transformers.GPT2LMHeadModel, tmp_path / "hf_again")
    assert torch.equal(_gpt2_logits(again), _gpt2_logits(legacy_gpt2))


# ---- the decomposition alone, no files ------------------------------------------------------

@pytest.mark.parametrize("case", sorted(view_matrix()))
def test_regions_address_every_element_of_every_sub_block(case):
    """StoredTensor.regions over random sub-blocks of each view's 2-D view, executed here as the
    core executes block copies (along rows: rows `stride` bytes apart; else columns), gives
    the view's elements."""
    import random

    from pyconv.catalog import StoredTensor, view2d

    view = view_matrix()[case]
    if view.numel() == 0:
        return
    storage = view.untyped_storage()
    isz = view.element_size()
    flat = torch.frombuffer(bytearray(bytes(storage)), dtype=torch.uint8)
    dtype = {1: "U8", 2: "F16", 4: "F32", 8: "I64"}[isz]  # only the item size matters here
    stored = StoredTensor("x", view.storage_offset() * isz, dtype, tuple(view.shape),
                          strides=None if view.is_contiguous() else tuple(view.stride()))
    rows, cols = view2d(tuple(view.shape))
    grid = view.contiguous().reshape(rows, cols).view(torch.uint8).reshape(rows, cols, isz)
    rng = random.Random(case)
    for _ in range(20):
        r0, c0 = rng.randrange(rows), rng.randrange(cols)
        nr, nc = rng.randint(1, rows - r0), rng.randint(1, cols - c0)
        got = torch.zeros(nr, nc, isz, dtype=torch.uint8)
        for reg in stored.regions(r0, c0, nr, nc):
            for i in range(reg.rows):
                for j in range(reg.cols):
                    at = reg.offset + (i * reg.stride + j * isz if reg.along_rows else j * reg.stride + i * isz)
                    got[reg.row + i, reg.col + j] = flat[at:at + isz]
        assert torch.equal(got, grid[r0:r0 + nr, c0:c0 + nc]), (r0, c0, nr, nc)
