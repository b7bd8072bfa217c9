"""Legacy (pre-Megatron-Core) Megatron-LM GPT and BERT checkpoints, format `megatron-legacy`.

Containers read:
    FILE.pt                                   one rank (tp = pp = 1), a torch.save archive
    FILE.zip                                  holding [PREFIX/](release|iter_NNNNNNN)/mp_rank_TT[_PPP]/
                                              model_optim_rng.pt (stored, uncompressed members are read in place)
    DIR/[latest_checkpointed_iteration.txt, release/ | iter_NNNNNNN/]mp_rank_TT[_PPP]/model_optim_rng.pt
                                              (or model_rng.pt, as with the distributed optimizer)
    FILE.nemo or its extracted DIR            NeMo 1: model_config.yaml + model_weights.ckpt (or mp_rank_TT/,
                                              tp_rank_TT_pp_rank_PPP/), a flat state dict under `model.`
                                              (an uncompressed .nemo tar is read in place)

Each rank file holds {"args": Namespace, "checkpoint_version": v, "model": {...}} with the
model as nested state dicts:

    language_model.embedding.{word,position,tokentype}_embeddings.weight
    language_model.encoder.layers.N.{input_layernorm, self_attention.query_key_value,
        self_attention.dense, post_attention_layernorm, mlp.dense_h_to_4h, mlp.dense_4h_to_h}.{weight,bias}
    language_model.encoder.final_layernorm.{weight,bias}     ('transformer' for 'encoder',
                                                               'attention' for 'self_attention' in old files)
    language_model.pooler.dense.*, lm_head.{dense.*, layernorm.*, bias}, binary_head.*       (BERT)
    language_model.output_layer.weight (untied), word_embeddings_for_head.weight (tied, last stage, pp > 1)

Legacy names map one to one onto Megatron-Core's (the table below), and from there the family
table (gpt2, bert) and the shard rules of pyconv.formats.megatron place every shard's rows in
the canonical tensors, TP and PP merged through SourceBlocks, nothing loaded whole. The fused
QKV rows of a TP rank are ordered by checkpoint_version (np = heads on the rank, hn = head dim):

    >= 2.0   [np, 3, hn]   (Megatron-Core's order for multi-head attention)
       1.0   [np, hn, 3]   read as a [np * hn, 3 * cols] view: q, k, v are column blocks
       0     [3, np, hn]   per rank, as Megatron's fix_query_key_value_ordering reads it

Vocabulary rows beyond the true vocabulary (args.orig_vocab_size or vocab_size, else the
padded size, as Hugging Face's converters do; a config.json in the checkpoint directory wins)
are dropped. Written (HF -> megatron-legacy, GPT-2 and BERT): checkpoint_version 3.0, the
vocabulary padded by repeating the last row, args as Hugging Face's GPT-2 converter writes them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import json
import os
import re
import struct
from argparse import Namespace
from dataclasses import dataclass

from pyconv.catalog import CanonicalTensor, Catalog, SourceBlock, StoredTensor
from pyconv.dtypes import FLOAT_DTYPES, TORCH_NAME, model_dtype
from pyconv.errors import FormatError, LayoutError
from pyconv.io.jsonfile import parse_yaml
from pyconv.mcore.checkpoint import RANK_DIR, RANK_FILES, TRACKER, skipped_training_state
from pyconv.plan import (
    PlannedFile,
    PlannedTensor,
    TargetSpec,
    plan_file_copy,
    plan_text_file,
)

if TYPE_CHECKING:
    import zipfile

    from pyconv.families import Family, ModelDims, TensorMapping

FORMAT = "megatron-legacy"
CHECKPOINT_VERSION = 3.0
CONFIG = "config.json"
# NeMo 1 (.nemo tar or its extracted directory): model_config.yaml plus model_weights.ckpt, or
# mp_rank_TT/model_weights.ckpt (tp > 1), or tp_rank_TT_pp_rank_PPP/model_weights.ckpt (pp > 1).
NEMO1_WEIGHTS = "model_weights.ckpt"
NEMO1_CONFIG = "model_config.yaml"
_NEMO1_RANK = re.compile(r"^(?:mp_rank_(?P<mp>\d{2})|tp_rank_(?P<t>\d{2})_pp_rank_(?P<p>\d{3}))/"
                         + re.escape(NEMO1_WEIGHTS) + "$")
_NEMO1_PREFIXES = ("model.module.", "model.")  # NeMo's LightningModule (and its O2 wrapper) around the model
_ZIP_RANK_MEMBER = re.compile(r"^(?P<dir>(?:.*/)?)mp_rank_(?P<t>\d{2})(?:_(?P<p>\d{3}))?/"
                              r"(?P<file>model_optim_rng|model_rng)\.pt$")
_ZIP_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")

# ---- legacy names <-> Megatron-Core names -------------------------------------------------------
# (legacy name, '/' where the nested state dicts split it; Megatron-Core name; parameters). '*' is
# the layer index local to the pipeline stage. The first row for a Megatron-Core name is the one
# written, except output_layer.weight (see _legacy_name).
_W, _WB = ("weight",), ("weight", "bias")
_NAME_TABLE = (
    ("language_model/embedding/word_embeddings/{p}", "embedding.word_embeddings.{p}", _W),
    ("language_model/embedding/position_embeddings/{p}", "embedding.position_embeddings.{p}", _W),
    ("language_model/embedding/tokentype_embeddings/{p}", "embedding.tokentype_embeddings.{p}", _W),
    ("language_model/encoder/layers.*.input_layernorm.{p}", "decoder.layers.*.input_layernorm.{p}", _WB),
    ("language_model/encoder/layers.*.self_attention.query_key_value.{p}",
     "decoder.layers.*.self_attention.linear_qkv.{p}", _WB),
    ("language_model/encoder/layers.*.self_attention.dense.{p}", "decoder.layers.*.self_attention.linear_proj.{p}",
     _WB),
    ("language_model/encoder/layers.*.post_attention_layernorm.{p}", "decoder.layers.*.pre_mlp_layernorm.{p}", _WB),
    ("language_model/encoder/layers.*.mlp.dense_h_to_4h.{p}", "decoder.layers.*.mlp.linear_fc1.{p}", _WB),
    ("language_model/encoder/layers.*.mlp.dense_4h_to_h.{p}", "decoder.layers.*.mlp.linear_fc2.{p}", _WB),
    ("language_model/encoder/final_layernorm.{p}", "decoder.final_layernorm.{p}", _WB),
    ("language_model/pooler/dense.{p}", "pooler.dense.{p}", _WB),
    ("language_model/output_layer/{p}", "output_layer.{p}", _W),  # untied output layer
    ("word_embeddings_for_head/{p}", "output_layer.{p}", _W),  # tied: the last stage's copy of the embedding
    ("word_embeddings/{p}", "output_layer.{p}", _W),  # the same copy as NeMo 1 names it (the module's attribute)
    ("lm_head/dense.{p}", "lm_head.dense.{p}", _WB),
    ("lm_head/layernorm.{p}", "lm_head.layer_norm.{p}", _WB),
    ("lm_head/{p}", "output_layer.{p}", ("bias",)),
    ("binary_head/{p}", "binary_head.{p}", _WB),
)
# Older spellings, rewritten before the table is consulted.
_ALIASES = (
    (re.compile(r"^language_model\.transformer\."), "language_model.encoder."),
    (re.compile(r"^(language_model\.encoder\.layers\.\d+\.)attention\."), r"\1self_attention."),
)
_ROWS = tuple((legacy.format(p=p), mcore.format(p=p)) for legacy, mcore, params in _NAME_TABLE for p in params)
_TO_MCORE = tuple((re.compile("^" + re.escape(legacy.replace("/", ".")).replace(r"\*", r"(\d+)") + "$"), mcore)
                  for legacy, mcore in _ROWS)
_TO_LEGACY: dict[str, str] = {}
for _legacy, _mcore in _ROWS:
    _TO_LEGACY.setdefault(_mcore, _legacy)
_TIED_HEAD = "word_embeddings_for_head/weight"

READ_OPTIONS = ("family",)  # read(path, family=...): the family of a checkpoint whose args do not tell it


@dataclass(frozen=True)
class Options:
    tp: int = 1
    pp: int = 1
    iteration: int | None = None           # None: release/
    vocab_divisible_by: int = 128          # Megatron's make_vocab_size_divisible_by
    first_stage_layers: int | None = None  # Megatron's decoder_first_pipeline_num_layers
    last_stage_layers: int | None = None   # Megatron's decoder_last_pipeline_num_layers



def mcore_name(legacy: str, stack: str = "decoder") -> str | None:
    """The Megatron-Core name of a legacy tensor path (dotted), or None; `stack` names the
    transformer block (decoder: GPT, encoder: BERT)."""
    for pattern, replacement in _ALIASES:
        legacy = pattern.sub(replacement, legacy)
    for regex, mcore in _TO_MCORE:
        m = regex.match(legacy)
        if m:
            name = mcore.replace("*", m.group(1)) if m.groups() else mcore
            return stack + name[len("decoder"):] if name.startswith("decoder.") else name
    return None


def _legacy_name(mcore: str, tied: bool) -> str:
    """The nested legacy path ('/'-separated state dicts) a Megatron-Core name is written under."""
    if mcore == "output_layer.weight" and tied:
        return _TIED_HEAD
    mcore = re.sub(r"^encoder\.", "decoder.", mcore)
    m = re.match(r"^decoder\.layers\.(\d+)\.(.*)$", mcore)
    key = f"decoder.layers.*.{m.group(2)}" if m else mcore
    legacy = _TO_LEGACY[key]
    return legacy.replace("*", m.group(1)) if m else legacy


# ---- where the rank files are ------------------------------------------------------------------

@dataclass(frozen=True)
class RankFile:
    """A torch.save archive: the whole of `path`, or bytes [base, base + size) of it (a stored
    member of a .zip). `label` is what messages name."""

    label: str
    path: str
    base: int = 0
    size: int | None = None


@dataclass(frozen=True)
class _Found:
    ranks: dict  # (tp rank, pp rank) -> RankFile
    iteration: str
    container: str  # "file", "zip", "directory", "nemo" or "nemo-directory"
    where: str  # the directory (or zip prefix) holding the rank dirs, for messages
    nemo_config: dict | None = None  # NeMo 1's model_config.yaml
    optimizer_files: tuple[str, ...] = ()  # the distributed optimizer's, not read


def _load(rank: RankFile):
    """The rank file's object tree (tensors as TensorRefs with absolute offsets in rank.path)."""
    try:
        f = open(rank.path, "rb")
    except OSError as e:
        raise FormatError(f"{rank.label}: cannot open: {e.strerror}") from None
    with f:
        try:  # detection peeks at the first rank file that reading parses: parsed once (io.parse_once)
            from pyconv.io.torchzip import read_torch_archive  # imported once a rank file is read

            return read_torch_archive(rank.path, f, rank.base, rank.size).obj
        except FormatError as e:
            message = str(e)
            if rank.label != rank.path and message.startswith(rank.path):
                message = rank.label + message[len(rank.path):]
            raise FormatError(message) from None


def _rank_key(t: str, p: str | None) -> tuple[int, int]:
    return int(t), int(p) if p is not None else 0


def _find_in_directory(root: str) -> _Found:
    from pyconv.mcore.checkpoint import find_rank_files, iteration_dir

    directory, iteration = iteration_dir(root)
    found = find_rank_files(directory)
    ranks = {}
    for numbers, file in found.ranks.items():
        if len(numbers) > 2:
            raise FormatError(f"{os.path.dirname(file)}: an expert-parallel rank; legacy Megatron-LM models have "
                              "no experts")
        ranks[(numbers[0], numbers[1] if len(numbers) > 1 else 0)] = RankFile(file, file)
    return _Found(ranks, iteration, "directory", directory, optimizer_files=found.optimizer_files)


def _zip_member_offset(path: str, f, info: zipfile.ZipInfo, file_size: int) -> int:
    """Where a stored member's bytes start, from its local header."""
    import zipfile  # only for .zip / .nemo archives

    if info.flag_bits & 0x1:
        raise FormatError(f"{path}: member '{info.filename[:200]}' is encrypted")
    if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
        raise FormatError(f"{path}: member '{info.filename[:200]}' is compressed (zip method {info.compress_type}); "
                          "pyconv reads stored (uncompressed) members in place: unzip the archive and convert the "
                          "directory, or re-zip it with `zip -0`")
    header = os.pread(f.fileno(), _ZIP_LOCAL_HEADER.size, info.header_offset)
    if len(header) < _ZIP_LOCAL_HEADER.size or _ZIP_LOCAL_HEADER.unpack(header)[0] != 0x04034B50:
        raise FormatError(f"{path}: local header of member '{info.filename[:200]}' at byte {info.header_offset} "
                          "is missing or corrupt")
    *_, name_len, extra_len = _ZIP_LOCAL_HEADER.unpack(header)
    start = info.header_offset + _ZIP_LOCAL_HEADER.size + name_len + extra_len
    if start + info.file_size > file_size:
        raise FormatError(f"{path}: member '{info.filename[:200]}' (bytes {start}..{start + info.file_size}) runs "
                          f"past the end of the file ({file_size} bytes): truncated archive?")
    return start


def _find_in_zip(path: str) -> _Found | None:
    """The rank files of a checkpoint .zip, or None when the zip is a torch.save archive itself."""
    import zipfile  # only for .zip / .nemo archives

    try:
        f = open(path, "rb")
    except OSError as e:
        raise FormatError(f"{path}: cannot open: {e.strerror}") from None
    with f:
        try:
            infos = zipfile.ZipFile(f).infolist()
        except Exception as e:  # noqa: BLE001 - zipfile raises many kinds on hostile directories
            raise FormatError(f"{path}: not a readable zip archive (truncated or corrupt?): {e}") from None
        members: dict[str, dict] = {}
        trackers: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            m = _ZIP_RANK_MEMBER.match(info.filename)
            if m:
                by_rank = members.setdefault(m.group("dir"), {})
                by_rank.setdefault(_rank_key(m.group("t"), m.group("p")), []).append(info)
            elif info.filename.endswith(TRACKER):
                trackers[info.filename[:-len(TRACKER)]] = info
        if not members:
            return None
        prefix = _choose_zip_iteration(path, f, members, trackers)
        file_size = os.fstat(f.fileno()).st_size
        ranks = {}
        for key, candidates in sorted(members[prefix].items()):
            info = min(candidates, key=lambda i: RANK_FILES.index(i.filename.rsplit("/", 1)[1]))
            offset = _zip_member_offset(path, f, info, file_size)
            ranks[key] = RankFile(f"{path}!{info.filename}", path, offset, info.file_size)
    iteration = os.path.basename(prefix.rstrip("/")) or "release"
    return _Found(ranks, iteration, "zip", f"{path}!{prefix or '/'}")


def _choose_zip_iteration(path: str, f, members: dict, trackers: dict) -> str:
    import zipfile  # only for .zip / .nemo archives

    if len(members) == 1:
        return next(iter(members))
    for parent, info in trackers.items():
        if info.file_size > 64:
            continue
        text = zipfile.ZipFile(f).read(info).decode("utf-8", "replace").strip()
        wanted = parent + ("release/" if text == "release" else f"iter_{int(text):07d}/" if text.isascii() and text.isdigit() else "?")
        if wanted in members:
            return wanted
    raise FormatError(f"{path}: holds several checkpoints ({', '.join(sorted(p or '/' for p in members))}) and no "
                      f"{TRACKER} that names one of them")


def _yaml(data: bytes, where: str) -> dict:
    config = parse_yaml(data, where)
    if isinstance(config, dict) and "num_layers" not in config and isinstance(config.get("model"), dict):
        config = config["model"]
    if not isinstance(config, dict):
        raise FormatError(f"{where}: not a NeMo model config (a YAML mapping)")
    return config


def _nemo1_rank(relative: str) -> tuple[int, int] | None:
    if relative == NEMO1_WEIGHTS:
        return 0, 0
    m = _NEMO1_RANK.match(relative)
    if m is None:
        return None
    return (int(m.group("mp")), 0) if m.group("mp") is not None else (int(m.group("t")), int(m.group("p")))


def _is_nemo1_dir(root: str) -> bool:
    return os.path.isfile(os.path.join(root, NEMO1_CONFIG)) and (
        os.path.isfile(os.path.join(root, NEMO1_WEIGHTS))
        or any(_nemo1_rank(f"{e}/{NEMO1_WEIGHTS}") for e in os.listdir(root)))


def _find_nemo1_dir(root: str) -> _Found:
    ranks = {}
    for entry in sorted(os.listdir(root)):
        relative = entry if entry == NEMO1_WEIGHTS else f"{entry}/{NEMO1_WEIGHTS}"
        key = _nemo1_rank(relative)
        if key is not None and os.path.isfile(os.path.join(root, relative)):
            ranks[key] = RankFile(os.path.join(root, relative), os.path.join(root, relative))
    if not ranks:
        raise FormatError(f"{root}: no {NEMO1_WEIGHTS} (nor mp_rank_TT/ or tp_rank_TT_pp_rank_PPP/ holding one)")
    config_path = os.path.join(root, NEMO1_CONFIG)
    with open(config_path, "rb") as f:
        config = _yaml(f.read(1 << 24), config_path)
    return _Found(ranks, "release", "nemo-directory", root, config)


def _find_in_tar(path: str) -> _Found:
    """A .nemo file: an uncompressed tar whose model_weights.ckpt members are read in place."""
    import tarfile

    with open(path, "rb") as f:
        head = f.read(2)
    if head == b"\x1f\x8b":
        raise FormatError(f"{path}: a gzip-compressed .nemo archive; pyconv reads uncompressed ones in place: "
                          "extract it (tar -xzf) and convert the directory")
    try:
        with tarfile.open(path, "r:") as tar:
            members = tar.getmembers()
            file_size = os.path.getsize(path)
            ranks, config = {}, None
            for m in members:
                name = m.name[2:] if m.name.startswith("./") else m.name
                key = _nemo1_rank(name)
                if key is not None and m.isreg():
                    if m.offset_data + m.size > file_size:
                        raise FormatError(f"{path}: member '{name}' runs past the end of the file: truncated archive?")
                    ranks[key] = RankFile(f"{path}!{name}", path, m.offset_data, m.size)
                elif name == NEMO1_CONFIG and m.isreg() and m.size <= 1 << 24:
                    config = _yaml(tar.extractfile(m).read(), f"{path}!{name}")
    except tarfile.TarError as e:
        raise FormatError(f"{path}: not a readable tar archive (truncated or corrupt?): {e}") from None
    if not ranks:
        raise FormatError(f"{path}: no {NEMO1_WEIGHTS} in the archive")
    return _Found(ranks, "release", "nemo", f"{path}!", config)


def _is_tar(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(257)
        return f.read(5) == b"ustar"


def _find(root: str) -> _Found:
    if os.path.isdir(root):
        return _find_nemo1_dir(root) if _is_nemo1_dir(root) else _find_in_directory(root)
    if _is_tar(root) or root.endswith(".nemo"):
        return _find_in_tar(root)
    found = _find_in_zip(root)
    if found is None:  # a torch.save archive: one rank
        return _Found({(0, 0): RankFile(root, root)}, "release", "file", os.path.dirname(root))
    return found


# ---- detection -------------------------------------------------------------------------------

def _is_nemo1_state(obj) -> bool:
    """NeMo 1's model_weights.ckpt: one flat state dict, `model.language_model....` keys."""
    return isinstance(obj, dict) and "model" not in obj and any(
        isinstance(k, str) and k.startswith(tuple(p + "language_model." for p in _NEMO1_PREFIXES)) for k in obj)


def _claims_archive(obj) -> bool:
    if _is_legacy_tree(obj):
        return True
    if isinstance(obj, dict) and ("model" in obj or "model0" in obj):
        return False  # a Megatron-Core rank file: the megatron adapter's
    from pyconv.io.torchzip import TensorRef

    return not (isinstance(obj, dict) and obj and all(type(v) is TensorRef for v in obj.values()))  # hf's .bin


def _is_legacy_tree(obj) -> bool:
    model = obj.get("model") if isinstance(obj, dict) else None
    return (isinstance(model, dict) and isinstance(model.get("language_model"), dict)) or _is_nemo1_state(obj)


def detect(path: str) -> bool:
    """A .nemo or a checkpoint .zip; a torch.save archive unless its tree is another adapter's (a
    Megatron-Core rank file, a flat state dict): reading says what is wrong with anything else. A
    directory of mp_rank_* dirs: ours when the first rank file's model has the legacy
    `language_model` tree (a Megatron-Core one is the megatron adapter's)."""
    if os.path.isfile(path):
        try:
            with open(path, "rb") as f:
                if _is_tar(path) or path.endswith(".nemo"):
                    return True
                if f.read(4) != b"PK\x03\x04":
                    return False
            if _find_in_zip(path) is not None:
                return True
            return _claims_archive(_load(RankFile(path, path)))
        except OSError:
            return False
        except FormatError:
            return True  # reading names the problem
    if not os.path.isdir(path):
        return False
    if _is_nemo1_dir(path):
        return True
    if not os.path.isfile(os.path.join(path, TRACKER)) and not any(RANK_DIR.match(e) for e in os.listdir(path)):
        return False
    try:
        found = _find_in_directory(os.path.abspath(path))
        return _is_legacy_tree(_load(found.ranks[min(found.ranks)]))
    except FormatError:
        return False  # the megatron adapter reports what is wrong


# ---- reading ---------------------------------------------------------------------------------

def _version(obj: dict, where: str) -> float:
    if _is_nemo1_state(obj):
        return 3.0  # NeMo 1's Megatron code orders fused QKV rows [np, 3, hn]
    version = obj.get("checkpoint_version", 0)
    if isinstance(version, bool) or not isinstance(version, (int, float)):
        raise FormatError(f"{where}: checkpoint_version is {version!r}, not a number")
    if version < 2.0 and version not in (0, 1.0):
        raise FormatError(f"{where}: checkpoint_version {version} is none of 0, 1.0 or >= 2.0 "
                          "(Megatron refuses it too)")
    return float(version)


def _legacy_refs(obj: dict, where: str) -> dict:
    """Legacy dotted name (no `model.` prefix) -> TensorRef, from a Megatron-LM rank file's model
    tree or a NeMo 1 flat state dict."""
    from pyconv.io.torchzip import iter_tensors

    if not isinstance(obj, dict):
        raise FormatError(f"{where}: not a Megatron checkpoint (top level is not a dict)")
    if _is_nemo1_state(obj):
        out = {}
        for key, ref in iter_tensors(obj):
            prefix = next((p for p in _NEMO1_PREFIXES if key.startswith(p)), None)
            if prefix is None:
                raise FormatError(f"{where}: tensor '{key}' is outside NeMo's 'model.' module")
            out[key[len(prefix):]] = ref
        return out
    if any(isinstance(k, str) and k.startswith(("model.decoder.", "model.embedding.", "model.encoder.")) for k in obj):
        raise FormatError(f"{where}: NeMo 1 weights in Megatron-Core names (model.decoder...): the nemo format reads "
                          "them from the extracted directory (tar -xf the .nemo); megatron-legacy reads the "
                          "pre-Megatron-Core language_model names")
    model = obj.get("model")
    if not isinstance(model, dict):
        virtual = [k for k in obj if isinstance(k, str) and k.startswith("model") and k[5:].isascii() and k[5:].isdigit()]
        raise FormatError(f"{where}: " + ("virtual pipeline checkpoints (model0, model1...) are not supported"
                                          if virtual else "no 'model' state dict"))
    if not isinstance(model.get("language_model"), dict):
        raise FormatError(f"{where}: the model has no 'language_model' state dict: not a legacy Megatron "
                          "checkpoint (a Megatron-Core one is the megatron format's)")
    return dict(iter_tensors(model))


def _model_tensors(refs: dict, where: str, stack: str) -> dict:
    """Megatron-Core name -> TensorRef for every tensor of a rank file's model."""
    out, legacy_of = {}, {}
    for legacy, ref in refs.items():
        name = mcore_name(legacy, stack)
        if name is None:
            raise FormatError(f"{where}: tensor 'model.{legacy}' matches no legacy Megatron GPT/BERT name")
        if name in out:
            raise FormatError(f"{where}: tensors 'model.{legacy_of[name]}' and 'model.{legacy}' are both the "
                              f"output layer")
        out[name], legacy_of[name] = ref, legacy
    return out


def _normalized_args(args: dict, where: str, tp: int, pp: int, padded_from_shapes: int) -> dict:
    """Legacy args in the keys megatron_dims and the family tables read."""
    out = dict(args)
    padded = args.get("padded_vocab_size")
    if padded is None:
        padded = padded_from_shapes
    elif padded != padded_from_shapes:
        raise FormatError(f"{where}: args say padded_vocab_size={padded} but the word embeddings hold "
                          f"{padded_from_shapes} rows over tp={tp}")
    true_vocab = args.get("orig_vocab_size") or args.get("vocab_size") or padded
    if not isinstance(true_vocab, int) or not 0 < true_vocab <= padded:
        raise FormatError(f"{where}: true vocabulary size {true_vocab!r} does not fit the padded size {padded}")
    out.update(padded_vocab_size=padded, vocab_size=true_vocab)
    if out.get("norm_epsilon") is None and args.get("layernorm_epsilon") is not None:
        out["norm_epsilon"] = args["layernorm_epsilon"]
    out["group_query_attention"] = False
    for key, value in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp)):
        if args.get(key) not in (None, value):
            raise FormatError(f"{where}: args say {key}={args[key]} but the checkpoint holds {value}")
    if args.get("swiglu") or args.get("position_embedding_type") not in (None, "learned_absolute") \
            or args.get("normalization", "LayerNorm") != "LayerNorm" or args.get("group_query_attention"):
        raise FormatError(f"{where}: legacy checkpoints with SwiGLU, rotary positions, RMSNorm or grouped-query "
                          "attention are not supported (GPT-2 and BERT layouts are)")
    return out


def _family(trees: dict, family: str | None, where: str) -> Family:
    """BERT when any rank holds a BERT-only part (token types, pooler, LM head, binary head)."""
    from pyconv.families import families_with, get_family

    if family is not None:
        if family not in {f.name for f in families_with(lambda f: f.legacy_megatron_stack)}:
            raise FormatError(f"{where}: legacy Megatron checkpoints are GPT-2 or BERT (family gpt2 or bert), "
                              f"not '{family}'")
        return get_family(family)
    bert_only = ("lm_head.", "binary_head.", "language_model.pooler.", "language_model.embedding.tokentype_embeddings.")
    if any(name.startswith(bert_only) for refs in trees.values() for name in refs):
        return get_family("bert")
    return get_family("gpt2")


def _dims(family: Family, args: dict, first: dict, where: str) -> ModelDims:
    from pyconv.mcore.config import megatron_dims

    dims = megatron_dims(args, where)
    if family.name == "bert":
        from pyconv.families.bert import DEFAULT_TOKEN_TYPES, BertDims

        tokentype = first.get("embedding.tokentype_embeddings.weight")
        token_types = tokentype.shape[0] if tokentype is not None and len(tokentype.shape) == 2 else \
            args.get("num_tokentypes") or DEFAULT_TOKEN_TYPES
        dims = BertDims(**{**vars(dims), "token_types": token_types, "tied": True})
    return dims


def read(path: str, family: str | None = None) -> Catalog:
    from pyconv.layout import layer_stages
    from pyconv.mcore.checkpoint import args_dict
    from pyconv.mcore.names import hf_names
    from pyconv.mcore.parallel import MegatronLayout, rank_dir_name

    root = os.path.abspath(path)
    found = _find(root)
    tp = max(t for t, _ in found.ranks) + 1
    pp = max(p for _, p in found.ranks) + 1
    for p in range(pp):
        for t in range(tp):
            if (t, p) not in found.ranks:
                raise FormatError(f"{found.where}: {rank_dir_name(t, p, pp)} is missing (found tp={tp}, pp={pp})")
    first_rank = found.ranks[(0, 0)]
    trees = {key: _load(rank) for key, rank in found.ranks.items()}
    refs = {key: _legacy_refs(trees[key], rank.label) for key, rank in found.ranks.items()}
    fam = _family(refs, family, first_rank.label)
    tensors_by_rank = {key: _model_tensors(refs[key], rank.label, fam.legacy_megatron_stack)
                       for key, rank in found.ranks.items()}
    first = trees[(0, 0)]
    version = _version(first, first_rank.label)
    for key, rank in found.ranks.items():
        if _version(trees[key], rank.label) != version:
            raise FormatError(f"{rank.label}: checkpoint_version {trees[key].get('checkpoint_version')} differs from "
                              f"{first_rank.label}'s {version}")
    config_path = os.path.join(root, CONFIG)
    config_override = _config_beside(root) if found.container in ("directory", "nemo-directory") else None
    if _is_nemo1_state(first):
        if found.nemo_config is None and config_override is None:
            raise FormatError(f"{found.where}: a NeMo 1 checkpoint without {NEMO1_CONFIG}: pyconv needs the model "
                              f"config (or the model's Hugging Face {CONFIG} beside the weights)")
        args = _nemo1_args(found.nemo_config, f"{found.where.rstrip('/')}/{NEMO1_CONFIG}") \
            if found.nemo_config is not None else _args_from_hf(fam, config_override, config_path)
    else:
        raw_args = first.get("args")
        if raw_args is None:
            # Old Megatron-LM saved no args; Hugging Face's converters then take a config file.
            # pyconv takes the model's HF config.json in (or, for a file, beside) the checkpoint.
            if config_override is None and found.container in ("file", "zip"):
                config_path = os.path.join(os.path.dirname(root), CONFIG)
                config_override = _config_beside(os.path.dirname(root))
            if config_override is None:
                raise FormatError(f"{first_rank.label}: no 'args': pyconv needs the training args (hidden size, heads, "
                                  f"layers), or the model's Hugging Face {CONFIG} beside the checkpoint")
            args = _args_from_hf(fam, config_override, config_path)
            args["padded_vocab_size"] = None  # from the shards
        else:
            args = args_dict(raw_args, first_rank.label)
    embedding = tensors_by_rank[(0, 0)].get("embedding.word_embeddings.weight")
    if embedding is None or len(embedding.shape) != 2:
        raise FormatError(f"{first_rank.label}: no 2-D 'model.language_model.embedding.word_embeddings.weight'")
    args = _normalized_args(args, first_rank.label, tp, pp, embedding.shape[0] * tp)
    if config_override is not None and isinstance(config_override.get("vocab_size"), int):
        if not 0 < config_override["vocab_size"] <= args["padded_vocab_size"]:
            raise FormatError(f"{config_path}: vocab_size {config_override['vocab_size']} does not fit "
                              f"the padded vocabulary of {args['padded_vocab_size']}")
        args["vocab_size"] = config_override["vocab_size"]
    dims = _dims(fam, args, tensors_by_rank[(0, 0)], first_rank.label)
    stages = layer_stages(dims.num_layers, pp, args.get("decoder_first_pipeline_num_layers"),
                          args.get("decoder_last_pipeline_num_layers"))
    layout = MegatronLayout(family=fam, dims=dims, padded_vocab=args["padded_vocab_size"], stages=stages,
                            tp=tp, pp=pp, ep=1)
    blocks: dict[str, list[SourceBlock]] = {}
    dtypes: dict[str, str] = {}
    for (t, p), tensors in sorted(found.ranks.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        _read_rank(found.ranks[(t, p)].label, tensors_by_rank[(t, p)], layout, t, p, version, blocks, dtypes)
    tensors = {}
    for entry in MegatronLayout(fam, dims, layout.padded_vocab, [range(dims.num_layers)], 1, 1, 1).entries(0, 0):
        for index, name in enumerate(hf_names(entry.mapping, entry.layer)):
            if name not in blocks or name in tensors:
                continue
            shape = _hf_shape(entry.mapping, index, dims)
            tensors[name] = CanonicalTensor.assembled(name, dtypes[name], shape, blocks[name], found.where)
    config = _hf_config(fam, args, dims)
    if config_override is not None:
        config = {**config_override, **{k: config[k] for k in ("architectures", "model_type") if k in config}}
    dtype = next(iter(dtypes.values()), None)
    if dtype in FLOAT_DTYPES and config_override is None:
        config["dtype"] = TORCH_NAME[dtype]
    extra = ()
    if found.container == "directory":  # (a NeMo directory's files are its tokenizer artifacts and YAML)
        extra = tuple((os.path.join(root, n), os.path.getsize(os.path.join(root, n)))
                      for n in sorted(os.listdir(root))
                      if n not in (TRACKER, CONFIG) and not n.startswith(".") and os.path.isfile(os.path.join(root, n)))
    details = {"family": fam.name, "tp": tp, "pp": pp, "iteration": found.iteration, "checkpoint_version": version,
               "container": found.container, "padded_vocab_size": layout.padded_vocab}
    note = skipped_training_state(found.optimizer_files, trees.values())
    return Catalog(FORMAT, root, tensors, config, fam.architectures[0], extra, details=details,
                   notes=(note,) if note else ())


def _nemo1_args(config: dict, where: str) -> dict:
    """NeMo 1's model config (Megatron-LM's argument names, mostly) as Megatron args."""
    args = {k: v for k, v in config.items() if isinstance(k, str) and not isinstance(v, (dict, list))}
    normalization = str(config.get("normalization", "layernorm")).lower()
    args["normalization"] = {"layernorm": "LayerNorm", "layernorm1p": "LayerNorm1p", "rmsnorm": "RMSNorm"}.get(
        normalization, normalization)
    activation = str(config.get("activation", "gelu")).lower()
    args["swiglu"] = activation in ("swiglu", "fast-swiglu")
    # NeMo fuses bias + GELU (the tanh approximation) unless told otherwise, as Megatron-LM does.
    args["bias_gelu_fusion"] = activation == "gelu" and bool(config.get("bias_activation_fusion", True)) \
        and not config.get("openai_gelu")
    args["openai_gelu"] = bool(config.get("openai_gelu"))
    if args.get("ffn_hidden_size") is None and isinstance(args.get("hidden_size"), int):
        args["ffn_hidden_size"] = 4 * args["hidden_size"]
    for key in ("num_layers", "hidden_size", "num_attention_heads", "max_position_embeddings"):
        if not isinstance(args.get(key), int) or isinstance(args.get(key), bool):
            raise FormatError(f"{where}: no integer '{key}'")
    return args


def _args_from_hf(family: Family, config: dict, where: str) -> dict:
    try:
        return family.megatron_args_from_hf(config, family.dims_from_hf(config))
    except FormatError as e:
        raise FormatError(f"{where}: {e}") from None


def _config_beside(root: str) -> dict | None:
    """An HF config.json in the checkpoint directory: the user's word on the model (true vocab)."""
    from pyconv.io.jsonfile import load_config

    path = os.path.join(root, CONFIG)
    return load_config(path) if os.path.isfile(path) else None


def _hf_shape(mapping: TensorMapping, index: int, dims: ModelDims) -> tuple[int, ...]:
    return mapping.rule.part_shape(mapping.shape(dims), index, len(mapping.hf), dims)


def _hf_config(family: Family, args: dict, dims: ModelDims) -> dict:
    from pyconv.families.common import original_hf_config

    if family.name == "bert":
        return family.hf_config_from_megatron({**args, "num_tokentypes": getattr(dims, "token_types", None)})
    # GPT-2 as Hugging Face's checkpoint_reshaping_and_interoperability.py builds its config.
    config = original_hf_config(args)
    activation = ("gelu_fast" if args.get("bias_gelu_fusion") else "gelu_new" if args.get("openai_gelu") else "gelu")
    if not config:
        config.update(bos_token_id=dims.vocab - 1, eos_token_id=dims.vocab - 1, scale_attn_weights=True)
    config.setdefault("activation_function", activation)
    config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=dims.vocab,
                  n_positions=dims.max_positions, n_embd=dims.hidden, n_layer=dims.num_layers, n_head=dims.heads,
                  layer_norm_epsilon=float(args.get("norm_epsilon") or 1e-5), tie_word_embeddings=dims.tied)
    if not ("n_inner" in config and config["n_inner"] is None and dims.ffn == 4 * dims.hidden):
        config["n_inner"] = dims.ffn  # (None, the source's way of saying 4 * n_embd, is kept)
    return config


def legacy_qkv_position(stored: StoredTensor, row: int, rows: int, col: int, dims: ModelDims, tp: int,
                        version: float) -> tuple[StoredTensor, int, int]:
    """Where rows [row, row + rows) x col.. of a TP rank's fused QKV shard, in the [np, 3, hn]
    order of version >= 2.0, lie in a shard stored in `version`'s order: (stored view, row, col).
    The rows must stay inside one head's q, k or v."""
    hn, local_heads = dims.head_dim, dims.heads // tp
    head, rest = divmod(row, 3 * hn)
    split, d0 = divmod(rest, hn)
    if d0 + rows > hn:
        raise LayoutError(f"fused QKV rows {row}..{row + rows} cross a head boundary (head_dim {hn})")
    if version >= 2.0:
        return stored, row, col
    if version == 0:
        return stored, split * local_heads * hn + head * hn + d0, col
    # 1.0: rows in [np, hn, 3] order; q, k or v alone is every third row from its own first
    strides = stored.element_strides
    split_view = stored.view(split * strides[0], (local_heads * hn,) + stored.shape[1:], (3 * strides[0],) + strides[1:])
    return split_view, head * hn + d0, col


def _read_rank(label: str, tensors: dict, layout, t: int, p: int, version: float,
               blocks: dict, dtypes: dict) -> None:
    """Adds the canonical blocks one rank file holds; every tensor in it must be accounted for."""
    from pyconv.layout import divide
    from pyconv.mcore.names import hf_names, megatron_tensor_name
    from pyconv.mcore.parallel import shard_shape

    dims, tp = layout.dims, layout.tp
    divide(dims.heads, tp, "num_attention_heads", "tp")
    seen = set()
    for entry in layout.entries(p, 0):
        mapping = entry.mapping
        key = megatron_tensor_name(mapping, "local", entry.local_layer)
        names = hf_names(mapping, entry.layer)
        if key not in tensors:
            if mapping.optional:
                continue
            raise FormatError(f"{label}: missing tensor 'model.{_legacy_name(key, dims.tied).replace('/', '.')}'")
        seen.add(key)
        ref = tensors[key]
        pieces = layout.pieces(mapping, names, t)
        expected = shard_shape(pieces, len(mapping.shape(dims)))
        if tuple(ref.shape) != expected:
            raise FormatError(f"{label}: tensor 'model.{_legacy_name(key, dims.tied).replace('/', '.')}' has shape "
                              f"{list(ref.shape)}, expected {list(expected)} for tp={tp} (hidden {dims.hidden}, heads "
                              f"{dims.heads}, ffn {dims.ffn}, padded vocab {layout.padded_vocab})")
        if mapping.rule.pads_vocab and key == "output_layer.weight" and dims.tied:
            continue  # the last stage's copy of the tied word embedding
        if mapping.rule.replicated and t > 0:
            continue  # replicas: taken from tensor-parallel rank 0
        stored = ref.stored()
        transposed = mapping.transposed and len(mapping.shape(dims)) == 2
        for piece in pieces:
            if piece.repeat:
                continue  # vocab padding carries nothing back
            view, row, col = stored, piece.dst_row, piece.dst_col
            if mapping.rule.fuses_qkv:
                view, row, col = legacy_qkv_position(stored, row, piece.rows, col, dims, tp, version)
            blocks.setdefault(piece.source, [])
            if dtypes.setdefault(piece.source, ref.dtype) != ref.dtype:
                raise FormatError(f"{label}: '{key}' is {ref.dtype} but other shards of {piece.source} are "
                                  f"{dtypes[piece.source]}")
            blocks[piece.source].append(piece.source_block(view, transposed, at=(row, col)))
    unknown = [k for k in tensors if k not in seen]
    if unknown:
        raise FormatError(f"{label}: tensor 'model.{_legacy_name(unknown[0], dims.tied).replace('/', '.')}' does not "
                          f"belong on pipeline stage {p} of a {layout.family.name} model"
                          + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))


# ---- writing ---------------------------------------------------------------------------------

def _writer_args(family: Family, config: dict, dims: ModelDims, target: TargetSpec, padded: int,
                 params_dtype: str, binary_head: bool) -> dict:
    """The args Hugging Face's GPT-2 converter saves, plus what Megatron-LM's loader and pyconv's
    reader want (the true vocab, the source config)."""
    from pyconv.io.torchsave import TorchDtypeValue

    activation = config.get("activation_function", config.get("hidden_act", "gelu"))
    args = {
        "orig_vocab_size": dims.vocab, "max_position_embeddings": dims.max_positions, "hidden_size": dims.hidden,
        "num_layers": dims.num_layers, "num_attention_heads": dims.heads, "ffn_hidden_size": dims.ffn,
        "kv_channels": dims.head_dim, "tensor_model_parallel_size": target.options.tp,
        "pipeline_model_parallel_size": target.options.pp, "data_parallel_size": 1,
        "make_vocab_size_divisible_by": target.options.vocab_divisible_by, "padded_vocab_size": padded, "rank": 0,
        "bias_gelu_fusion": activation == "gelu_fast", "openai_gelu": activation == "gelu_new",
        "params_dtype": TorchDtypeValue(TORCH_NAME.get(params_dtype, "float32")),
        "fp16": params_dtype == "F16", "bf16": params_dtype == "BF16",
        "untie_embeddings_and_output_weights": not dims.tied, "iteration": target.options.iteration or 0,
        "pyconv_hf_config": json.dumps(config, sort_keys=True),
    }
    if family.name == "bert":
        eps = float(config.get("layer_norm_eps", 1e-12))
        args.update(tokenizer_type="BertWordPieceLowerCase", bert_binary_head=binary_head, layernorm_epsilon=eps,
                    num_tokentypes=getattr(dims, "token_types", 2))
    else:
        args.update(tokenizer_type="GPT2BPETokenizer", layernorm_epsilon=float(config.get("layer_norm_epsilon", 1e-5)))
    return args


def plan_output(catalog: Catalog, target: TargetSpec) -> list[PlannedFile]:
    from pyconv.layout import layer_stages, padded_vocab_size
    from pyconv.mcore.config import check_tensor_parallel, family_and_dims
    from pyconv.mcore.parallel import MegatronLayout

    family, dims = family_and_dims(catalog)
    if family.legacy_megatron_stack is None:
        raise LayoutError(f"{catalog.path}: legacy Megatron checkpoints hold GPT-2 or BERT models, not "
                          f"{catalog.architecture} (Megatron-Core checkpoints are the megatron format)")
    if target.options.tp < 1 or target.options.pp < 1:
        raise LayoutError(f"legacy Megatron takes tp >= 1 and pp >= 1 (got tp={target.options.tp}, "
                          f"pp={target.options.pp})")
    if target.dtype not in (None, *FLOAT_DTYPES):
        raise LayoutError(f"legacy Megatron checkpoints hold fp32, bf16 or fp16 weights, not {target.dtype}")
    check_tensor_parallel(dims, target.options.tp, family)
    padded = padded_vocab_size(dims.vocab, target.options.vocab_divisible_by, target.options.tp)
    stages = layer_stages(dims.num_layers, target.options.pp, target.options.first_stage_layers, target.options.last_stage_layers)
    args = _writer_args(family, catalog.config, dims, target, padded,
                        model_dtype(target.dtype, (t.dtype for t in catalog.tensors.values())),
                        binary_head="cls.seq_relationship.weight" in catalog.tensors)
    if target.options.first_stage_layers is not None or target.options.last_stage_layers is not None:
        args.update(decoder_first_pipeline_num_layers=target.options.first_stage_layers,
                    decoder_last_pipeline_num_layers=target.options.last_stage_layers)
    layout = MegatronLayout(family, dims, padded, stages, target.options.tp, target.options.pp, 1)
    iteration_dir = "release" if target.options.iteration is None else f"iter_{target.options.iteration:07d}"
    files = [_plan_rank_file(catalog, layout, target, args, iteration_dir, t, p)
             for p in range(target.options.pp) for t in range(target.options.tp)]
    files.append(plan_text_file(TRACKER, "release" if target.options.iteration is None else str(target.options.iteration)))
    files.extend(plan_file_copy(path, size, os.path.basename(path)) for path, size in catalog.extra_files)
    return files


def _plan_rank_file(catalog: Catalog, layout, target: TargetSpec, args: dict, iteration_dir: str,
                    t: int, p: int) -> PlannedFile:
    from pyconv.dtypes import output_dtype
    from pyconv.io.torchsave import TensorSlot, layout_torch_save
    from pyconv.mcore.names import hf_names, megatron_tensor_name
    from pyconv.mcore.parallel import rank_dir_name, shard_shape

    family, dims, pp = layout.family, layout.dims, layout.pp
    model: dict = {}
    planned: dict[int, tuple] = {}  # id(slot) -> (name, dtype, shape, copies)
    for entry in layout.entries(p, 0):
        mapping = entry.mapping
        names = hf_names(mapping, entry.layer)
        mcore = megatron_tensor_name(mapping, "local", entry.local_layer)
        if mcore == "output_layer.weight" and dims.tied:
            if pp == 1:
                continue  # one stage: the output layer is the word embedding itself
            names = [next(m for m in family.mappings if m.megatron == "embedding.word_embeddings.weight").hf[0]]
        missing = [n for n in names if n not in catalog.tensors]
        if missing:
            if mapping.optional and len(missing) == len(names):
                continue
            raise LayoutError(f"{catalog.path}: tensor '{missing[0]}' is missing")
        pieces = layout.pieces(mapping, names, t)
        transposed = mapping.transposed and len(mapping.shape(dims)) == 2
        copies = [c for piece in pieces for c in piece.copies(catalog.tensors[piece.source], transposed)]
        dtype = output_dtype(catalog.tensors[names[0]], target.dtype)
        shape = shard_shape(pieces, len(mapping.shape(dims)))
        slot = TensorSlot(dtype, shape)
        legacy = _legacy_name(mcore, dims.tied)
        *containers, leaf = legacy.split("/")
        node = model
        for c in containers:
            node = node.setdefault(c, {})
        node[leaf] = slot
        planned[id(slot)] = (legacy.replace("/", "."), dtype, shape, copies)
    obj = {"args": Namespace(**args), "checkpoint_version": CHECKPOINT_VERSION,
           "iteration": target.options.iteration or 0, "model": model}
    zip_layout, slots = layout_torch_save(obj)
    tensors = tuple(PlannedTensor(*planned[id(slot)][:3], offset, tuple(planned[id(slot)][3]))
                    for slot, offset in zip(slots, zip_layout.record_offsets))
    path = f"{iteration_dir}/{rank_dir_name(t, p, pp)}/{RANK_FILES[0]}"
    return PlannedFile(path, zip_layout.size, tensors, zip_layout.literals)
