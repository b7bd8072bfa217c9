"""Megatron-Core as the judge of pipelined checkpoints (interleaved/virtual pipelines, uneven
stages, pipeline_model_parallel_layout, embedding/loss counted in the split), run under
torchrun with one process per pipeline rank (tp 1, CPU, gloo)::

    torchrun --nproc-per-node PP tests/megatron_vpp.py --ckpt DIR --hf-config CONFIG.json --pp PP \\
        --vpp V [--first N --last M | --layout STR | --account-embedding --account-loss] \\
        --input IDS.pt --out LOGITS.pt
    torchrun --nproc-per-node PP tests/megatron_vpp.py --save-from HF_DIR --ckpt OUT --pp PP --vpp V [...]

Rank p builds its V model chunks as Megatron-LM does (GPTModel(vp_stage=v), the embedding on
chunk 0 of rank 0, the output layer on chunk V-1 of the last rank; Megatron-Core decides which
layers each chunk holds). Logits: each chunk loads `model{v}` of mp_rank_00_PPP strictly and
the chunks run in the interleaved order, chunk v of every rank before chunk v + 1 of any, the
hidden states passed rank to rank with send/recv; the last rank writes the logits. Save: each
chunk is filled from the HF weights by Megatron-Core's own layer offsets and saved with its
state_dict_for_save_checkpoint(), as Megatron-LM's save_checkpoint writes model0..model{V-1}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import megatron_harness as mh  # noqa: E402

SCRIPT = Path(__file__).resolve()


def _chunk_models(cfg: dict, pp: int, vpp: int, first: int | None = None, last: int | None = None,
                  layout: str | None = None, embedding: bool = False, loss: bool = False, mtp: int = 0):
    """This rank's V GPTModel chunks (local spec), in vp_stage order (vp_stage None when V = 1).
    DeepSeek (multi-latent attention): the decoder block spec of each chunk's layers, and `mtp`
    multi-token-prediction layers where Megatron-Core places them."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_block_spec, get_gpt_decoder_layer_specs, get_gpt_layer_local_spec, get_gpt_mtp_block_spec,
    )
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    import torch

    t = mh.translate_hf_config(cfg, 1, pp)
    config = (MLATransformerConfig if t.get("mla") else TransformerConfig)(
        **t["transformer_config"], pipeline_dtype=torch.float32,
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
        num_layers_in_first_pipeline_stage=first, num_layers_in_last_pipeline_stage=last,
        pipeline_model_parallel_layout=layout, account_for_embedding_in_pipeline_split=embedding,
        account_for_loss_in_pipeline_split=loss, **({"mtp_num_layers": mtp} if mtp else {}))
    p = parallel_state.get_pipeline_model_parallel_rank()

    def specs(v):
        """(decoder spec, MTP spec or None) of chunk v of this rank."""
        if not t.get("mla"):
            return get_gpt_layer_local_spec(normalization=t["normalization"]), None
        vp = v if vpp > 1 else None
        block = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm",
                                           vp_stage=vp, pp_rank=p)
        last_layer = get_gpt_decoder_layer_specs(config, False, "RMSNorm")[-1]
        for layer_spec in (*block.layer_specs, last_layer):
            layer_spec.submodules.self_attention.submodules.core_attention = mh.mla_dot_product_attention()
        mtp_spec = (get_gpt_mtp_block_spec(config, last_layer, use_transformer_engine=False, vp_stage=vp, pp_rank=p)
                    if mtp else None)
        return block, mtp_spec

    if vpp > 1:  # as initialize_model_parallel(virtual_pipeline_model_parallel_size=vpp) sets it for Megatron-LM
        parallel_state.set_virtual_pipeline_model_parallel_world_size(vpp)
    models = []
    # Tied embeddings over pipeline stages: GPTModel all-reduces the two copies after moving
    # them with .cuda(); on a CPU the tensor stays where it is (gloo reduces CPU tensors).
    cuda = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        for v in range(vpp):
            spec, mtp_spec = specs(v)
            models.append(GPTModel(config=config, transformer_layer_spec=spec, vocab_size=t["padded_vocab_size"],
                                   pre_process=(p == 0 and v == 0), post_process=(p == pp - 1 and v == vpp - 1),
                                   parallel_output=False, vp_stage=v if vpp > 1 else None, mtp_block_spec=mtp_spec,
                                   **t["gpt_model"]).eval())
    finally:
        torch.Tensor.cuda = cuda
    return config, models


def _load_chunk(model, sd: dict, where: str) -> None:
    own = {k for k in model.state_dict() if not k.endswith("_extra_state")}
    got = {k for k in sd if not k.endswith("_extra_state")}
    if own != got:
        raise mh.StateDictMismatch(f"{where}: missing {sorted(own - got)}, unexpected {sorted(got - own)}")
    model.load_state_dict(sd, strict=True)


def _logits(args) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    cfg = json.loads(Path(args.hf_config).read_text())
    with mh.megatron_parallel(1, args.pp):
        config, models = _chunk_models(cfg, args.pp, args.vpp, *_placement(args), mtp=args.mtp)
        p = parallel_state.get_pipeline_model_parallel_rank()
        f = mh.checkpoint_file(args.ckpt, 0, p, args.pp)
        ckpt = torch.load(f, map_location="cpu", weights_only=False)
        for v, model in enumerate(models):
            key = _chunk_key(v, args.vpp)
            if key not in ckpt:
                raise mh.StateDictMismatch(f"{f}: no '{key}' (keys: {sorted(ckpt)})")
            _load_chunk(model, ckpt[key], f"{f} {key}")
        # Megatron-Core runs MTP only for its training loss (with labels): the main model's forward
        mtp_held = [m.mtp_process for m in models]
        for model in models:
            model.mtp_process = False
        config.mtp_num_layers = None
        if args.mtp_out is not None:  # which chunks held the MTP layers, for the caller to check
            torch.save([v * args.pp + p for v, held in enumerate(mtp_held) if held], f"{args.mtp_out}.{p}")
        ids = torch.load(args.input, weights_only=True)
        b, s = ids.shape
        position_ids = torch.arange(s, dtype=torch.long).unsqueeze(0).expand(b, s)
        mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]
        hidden_shape = (s, b, cfg["hidden_size"])
        chunks = args.pp * args.vpp
        with torch.no_grad():
            for k in range(chunks):  # model chunk k = v * pp + p runs on rank k % pp
                if k % args.pp != p:
                    continue
                model = models[k // args.pp]
                if k > 0:
                    hidden = torch.empty(hidden_shape)
                    dist.recv(hidden, src=(k - 1) % args.pp)
                    model.set_input_tensor(hidden)
                out = model(ids, position_ids, mask)
                if k < chunks - 1:
                    dist.send(out.contiguous(), dst=(k + 1) % args.pp)
                else:
                    torch.save(out[..., :cfg["vocab_size"]].float().contiguous(), args.out)
        dist.barrier()


def _save(args) -> None:
    import re

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    cfg = mh._config_dict(args.save_from)
    with mh.megatron_parallel(1, args.pp):
        config, models = _chunk_models(cfg, args.pp, args.vpp, *_placement(args))
        p = parallel_state.get_pipeline_model_parallel_rank()
        full = mh.megatron_full_tensors(mh._read_hf_weights(args.save_from), cfg)
        full = mh.megatron_shard(full, cfg, 1, 0)
        ckpt_args = mh.megatron_args(cfg, 1, args.pp)
        ckpt_args.virtual_pipeline_model_parallel_size = args.vpp
        ckpt_args.decoder_first_pipeline_num_layers = args.first
        ckpt_args.decoder_last_pipeline_num_layers = args.last
        ckpt_args.pipeline_model_parallel_layout = args.layout
        ckpt_args.account_for_embedding_in_pipeline_split = args.account_embedding
        ckpt_args.account_for_loss_in_pipeline_split = args.account_loss
        ckpt = {"args": ckpt_args, "checkpoint_version": mh.CHECKPOINT_VERSION, "iteration": 0}
        for v, model in enumerate(models):
            offset = get_transformer_layer_offset(config, vp_stage=v if args.vpp > 1 else None)  # Megatron-Core's

            def global_name(name):
                return re.sub(r"^decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{int(m.group(1)) + offset}.",
                              name)

            with torch.no_grad():
                for name, param in model.named_parameters():
                    source = full.get(global_name(name))
                    if source is None and name == "output_layer.weight":
                        source = full["embedding.word_embeddings.weight"]  # tied: the last stage's copy
                    if source is None or tuple(source.shape) != tuple(param.shape):
                        raise mh.StateDictMismatch(f"rank {p} chunk {v}: {name} -> {global_name(name)}")
                    param.copy_(source)
            ckpt[_chunk_key(v, args.vpp)] = model.state_dict_for_save_checkpoint()
        f = mh.checkpoint_file(args.ckpt, 0, p, args.pp)
        f.parent.mkdir(parents=True, exist_ok=True)
        torch.save(ckpt, f)
        dist.barrier()
        if dist.get_rank() == 0:
            (Path(args.ckpt) / "latest_checkpointed_iteration.txt").write_text("release")


def _chunk_key(v: int, vpp: int) -> str:
    return "model" if vpp == 1 else f"model{v}"


def _placement(args) -> tuple:
    return args.first, args.last, args.layout, args.account_embedding, args.account_loss


def _torchrun(script_args, nproc: int, timeout: float = 180.0) -> None:
    mh.run_torchrun(script_args, nproc, timeout, script=SCRIPT)


def _stage_args(first=None, last=None, layout=None, account_embedding=False, account_loss=False) -> list:
    return [*(["--first", first] if first is not None else []), *(["--last", last] if last is not None else []),
            *(["--layout", layout] if layout else []), *(["--account-embedding"] if account_embedding else []),
            *(["--account-loss"] if account_loss else [])]


def vpp_logits(ckpt_dir, hf_config: dict, pp: int, vpp: int, input_ids, first=None, last=None, mtp: int = 0,
               **placement):
    """[b, s, vocab] logits of Megatron-Core running a pipelined checkpoint (pp processes).
    placement: layout (pipeline_model_parallel_layout), account_embedding, account_loss. With
    mtp: (logits, the model chunks Megatron-Core built the MTP layers in)."""
    import torch

    with tempfile.TemporaryDirectory(prefix="megatron_vpp_") as tmp:
        cfg, ids, out = Path(tmp) / "config.json", Path(tmp) / "ids.pt", Path(tmp) / "logits.pt"
        cfg.write_text(json.dumps(hf_config))
        torch.save(torch.as_tensor(input_ids, dtype=torch.long), ids)
        mtp_args = ["--mtp", mtp, "--mtp-out", Path(tmp) / "mtp"] if mtp else []
        _torchrun(["--ckpt", ckpt_dir, "--hf-config", cfg, "--pp", pp, "--vpp", vpp, "--input", ids, "--out", out,
                   *_stage_args(first, last, **placement), *mtp_args], nproc=pp)
        logits = torch.load(out, weights_only=True)
        if not mtp:
            return logits
        held = sorted(k for p in range(pp) for k in torch.load(Path(tmp) / f"mtp.{p}", weights_only=True))
        return logits, held


def save_vpp_with_megatron(hf_model_dir, out_dir, pp: int, vpp: int, first=None, last=None, **placement) -> Path:
    _torchrun(["--save-from", hf_model_dir, "--ckpt", out_dir, "--pp", pp, "--vpp", vpp,
               *_stage_args(first, last, **placement)], nproc=pp)
    return Path(out_dir)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--hf-config")
    parser.add_argument("--save-from")
    parser.add_argument("--pp", type=int, required=True)
    parser.add_argument("--vpp", type=int, required=True)
    parser.add_argument("--first", type=int)
    parser.add_argument("--last", type=int)
    parser.add_argument("--layout")
    parser.add_argument("--account-embedding", action="store_true")
    parser.add_argument("--account-loss", action="store_true")
    parser.add_argument("--mtp", type=int, default=0)
    parser.add_argument("--mtp-out")
    parser.add_argument("--input")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.save_from:
        _save(args)
    else:
        _logits(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
