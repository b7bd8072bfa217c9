"""The pyconv command line: argument parsing and printing only.

Exit codes: 0 success; 1 a verification mismatch; 2 bad input, usage or an unwritable
destination (one line on stderr naming the file and the problem); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from contextlib import contextmanager

EXIT_OK, EXIT_MISMATCH, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def _one_line(message: str) -> str:
    """Control characters (a tensor name may hold a newline) are escaped: errors stay on one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, with the same prefix as every other error
        command = self.prog.removeprefix("pyconv").strip()
        hint = f" (see 'pyconv {command} --help')" if command else " (see 'pyconv --help')"
        self.exit(EXIT_BAD_INPUT, f"pyconv: error: {_one_line(message)}{hint}\n")


class _Formatter(argparse.HelpFormatter):
    """Descriptions wrap to the terminal; the examples and exit codes keep their lines."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=32)

    def _fill_text(self, text, width, indent):
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def _formatter(prog):
    return _Formatter(prog)


def _examples(*lines: tuple[str, str]) -> str:
    """'examples:' then one command per line, their comments aligned."""
    width = max(len(command) for command, _ in lines)
    return "examples:\n" + "\n".join(f"  {command:<{width}}  # {comment}" if comment else f"  {command}"
                                       for command, comment in lines)


_INSPECT_EXAMPLES = _examples(
    ("pyconv inspect ./Llama-3.1-8B", "an HF directory"),
    ("pyconv inspect ./megatron/ckpt --tensors", "Megatron-LM rank directories, every tensor"),
    ("pyconv inspect ./ckpt/iter_0001000 --json", "one iteration of a torch_dist run, as JSON"),
    ("pyconv inspect ./model.safetensors", "a single file"),
)
_RESHARD_EXAMPLES = _examples(
    ("pyconv reshard ./Llama-3.1-8B ./llama-mcore --to megatron --tp 4 --pp 2", ""),
    ("pyconv reshard ./llama-mcore ./llama-hf --to hf --dtype bf16 --max-shard-size 5GB", ""),
    ("pyconv reshard ./Mixtral-8x7B ./mixtral-mcore --to megatron --tp 2 --ep 4 --moe-grouped-gemm", ""),
    ("pyconv reshard ./Qwen2.5-7B ./qwen-dist --to torch_dist --dry-run", ""),
    ("pyconv reshard ./DeepSeek-V3 ./ds-mp8 --to deepseek --tp 8", ""),
)
_VERIFY_EXAMPLES = _examples(
    ("pyconv verify ./Llama-3.1-8B ./llama-mcore", "every tensor bit for bit, any two formats"),
    ("pyconv verify ./llama-hf ./llama-bf16 --atol 1e-2 --rtol 1e-2", "within a tolerance"),
    ("pyconv verify ./a ./b --json", "the report as JSON"),
)
_DEMO_EXAMPLES = _examples(
    ("pyconv demo", "in a temporary directory, removed after"),
    ("pyconv demo --workdir ./demo", "keep the models in ./demo"),
)


def _build_parser() -> argparse.ArgumentParser:
    from pyconv import __version__
    from pyconv.formats import format_names, writable_format_names  # the registry's names; no adapter imported

    parser = _Parser(prog="pyconv", formatter_class=_formatter,
                     description="Convert and reshard LLM checkpoints between Hugging Face, Megatron-LM / "
                                 "Megatron-Core, torch_dist, NeMo, DeepSeek's inference layout and MindSpore.",
                     epilog="exit codes: 0 done, 1 verify found differences, 2 bad input or usage, 130 interrupted\n"
                            "'pyconv COMMAND --help' shows a command's options and examples.")
    parser.add_argument("--version", action="version", version=f"pyconv {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("inspect", help="show a checkpoint's format, architecture, tensors and sizes",
                       description="Reads a checkpoint's headers (no tensor bytes) and shows its format, "
                                   "architecture, tensor count and bytes, and the parallel layout it was saved in.",
                       epilog=_INSPECT_EXAMPLES, formatter_class=_formatter)
    p.add_argument("path", help="a checkpoint directory or file, in any format pyconv reads")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--tensors", action="store_true", help="also list every tensor: name, dtype, shape")

    p = sub.add_parser("reshard", help="convert SRC into DST (any format, parallel layout and dtype)",
                       description="Converts the checkpoint SRC into DST in the target format, layout and dtype. "
                                   "DST appears whole or not at all; SRC is never modified.",
                       epilog=_RESHARD_EXAMPLES, formatter_class=_formatter)
    p.add_argument("src", help="the source checkpoint: a directory or a single file")
    p.add_argument("dst", help="the directory to create (must not exist, unless --force)")
    p.add_argument("--to", default="hf", choices=writable_format_names(), metavar="FORMAT",
                   help=f"target format: {', '.join(writable_format_names())} (default: hf)")
    p.add_argument("--from", dest="source_format", default=None, choices=format_names(), metavar="FORMAT",
                   help="source format, when detection should not decide (default: detected)")
    p.add_argument("--family", default=None, help="model family of a Megatron source whose args do not tell it")
    p.add_argument("--tp", type=int, default=None,
                   help="tensor (model) parallel size of a megatron or deepseek target; for torch_dist only the "
                        "vocabulary padding (default 1)")
    p.add_argument("--pp", type=int, default=None, help="pipeline parallel size of a megatron target (default 1)")
    p.add_argument("--vpp", type=int, default=None,
                   help="model chunks per pipeline rank of a megatron target: an interleaved (virtual) pipeline "
                        "saved as model0..modelN-1 (default 1)")
    p.add_argument("--ep", type=int, default=None, help="expert parallel size of a megatron MoE target (default 1)")
    p.add_argument("--etp", type=int, default=None,
                   help="expert tensor parallel size of a megatron MoE target: routed experts split over etp "
                        "ranks instead of tp (default: tp)")
    p.add_argument("--megatron-naming", choices=["te", "local"], default=None,
                   help="TransformerEngine fused-norm names (te, default) or local module names")
    p.add_argument("--moe-grouped-gemm", action="store_true", default=None,
                   help="write experts with TransformerEngine's grouped-GEMM names (experts.linear_fc1.weightJ)")
    p.add_argument("--iteration", type=int, default=None, help="write iter_NNNNNNN/ instead of release/")
    p.add_argument("--make-vocab-size-divisible-by", dest="vocab_divisible_by", type=int, default=None,
                   help="Megatron pads the vocabulary to a multiple of this times tp (default 128)")
    p.add_argument("--pipeline-layout", default=None,
                   help="Megatron-Core's pipeline_model_parallel_layout for a megatron target, e.g. 'Et*3|(tt|)*2,tL': "
                        "one stage per model chunk (chunk v of rank p is stage v*pp+p), E embedding, t layer, L loss")
    p.add_argument("--first-stage-layers", type=int, default=None,
                   help="layers on the first pipeline stage (Megatron's decoder_first_pipeline_num_layers)")
    p.add_argument("--last-stage-layers", type=int, default=None,
                   help="layers on the last pipeline stage (Megatron's decoder_last_pipeline_num_layers)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16", "fp8"], default=None,
                   help="cast floating tensors; fp8 quantizes the layers' linear weights with 128x128 block "
                        "scales; a float dtype dequantizes block-scaled fp8 weights (default: keep)")
    p.add_argument("--max-shard-size", default=None,
                   help="largest output file of hf, torch_dist, nemo and mindspore targets: 5GB (decimal), 4GiB "
                        "or bytes (default 5GB)")
    p.add_argument("--merge-lora", action="append", default=[], metavar="ADAPTER",
                   help="a Hugging Face PEFT LoRA adapter directory to merge into the weights while converting "
                        "(repeatable: merged in order); --dry-run lists the tensors it changes")
    p.add_argument("--language-model", action="store_true",
                   help="convert the language model of a multimodal checkpoint (Gemma3ForConditionalGeneration) "
                        "alone, as its text model; its vision tower and projector are left out, with a note")
    p.add_argument("--force", action="store_true", help="replace DST if it exists (only once the new one is complete)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (files, tensors, notes); write nothing")
    p.add_argument("--json", action="store_true", help="print JSON (the plan with --dry-run, else the report)")
    p.add_argument("--threads", type=int, default=4, help="copy threads (default 4)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cpu: the C++ core (default); cuda: casts and fp8 in Triton kernels on a GPU "
                        "(on the CPU under TRITON_INTERPRET=1), same output")

    p = sub.add_parser("verify", help="compare two checkpoints (any formats) tensor by tensor; exit 1 if they differ",
                       description="Compares every tensor of A and B by its canonical (Hugging Face) name, bit for "
                                   "bit unless a tolerance is given, whatever their formats and layouts. Exit 0 when "
                                   "equal, 1 when they differ.",
                       epilog=_VERIFY_EXAMPLES, formatter_class=_formatter)
    p.add_argument("a", help="one checkpoint (directory or file)")
    p.add_argument("b", help="the other checkpoint")
    p.add_argument("--atol", type=float, default=None, help="absolute tolerance (default: bit for bit)")
    p.add_argument("--rtol", type=float, default=None, help="relative tolerance (default: bit for bit)")
    p.add_argument("--family", default=None, help="model family of a Megatron side whose args do not tell it")
    p.add_argument("--threads", type=int, default=4, help="compare threads (default 4)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("lora", help="carry a LoRA adapter between Hugging Face PEFT and Megatron-Bridge's layout",
                       description="Writes a LoRA adapter (unmerged) in another layout: a Hugging Face PEFT adapter "
                                   "directory to Megatron-Bridge's CanonicalLoRA tensors, one file per tensor-parallel "
                                   "rank (--to megatron, --base names the model it adapts), or back (--to peft). Block "
                                   "copies only: the round trip is bitwise. To merge an adapter, use reshard "
                                   "--merge-lora.",
                       epilog="examples:\n  pyconv lora my-adapter adapter-meg --to megatron --tp 2 --base llama-hf\n"
                              "  pyconv lora adapter-meg my-adapter-again --to peft",
                       formatter_class=_formatter)
    p.add_argument("src", help="the adapter: a PEFT directory, or a Megatron-layout adapter written by pyconv")
    p.add_argument("dst", help="the directory to create (must not exist, unless --force)")
    p.add_argument("--to", required=True, choices=["megatron", "peft"], help="the layout to write")
    p.add_argument("--base", default=None, help="the model the adapter adapts (any format pyconv reads): its family")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size of the Megatron layout (default 1)")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")

    p = sub.add_parser("demo", help="build a tiny Llama with transformers, convert it, check it loads",
                       description="The main job on an embedded default: a small Llama (GQA) built with "
                                   "transformers from a config (no download), converted by pyconv (re-sharded, "
                                   "cast to bf16, to Megatron tp 2 pp 2 and back), each result loaded by "
                                   "transformers and compared with the source. Needs torch and transformers.",
                       epilog=_DEMO_EXAMPLES, formatter_class=_formatter)
    p.add_argument("--workdir", default=None,
                   help="keep the models in this directory (default: a temporary directory, removed after)")
    return parser


def _progress_bar(enabled: bool):
    """(progress, phase, close) for reshard: bytes done of the total and the phase (copying,
    syncing, committing), fitted to the terminal's width however narrow."""
    if not enabled:
        return None, None, lambda: None
    from tqdm import tqdm

    bar = tqdm(total=0, unit="B", unit_scale=True, file=sys.stderr, desc="copying", leave=False, dynamic_ncols=True,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}B/{total_fmt}B [{elapsed}<{remaining}]")

    def update(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    def phase(name: str) -> None:
        bar.set_description_str(name)

    return update, phase, bar.close


def _cmd_inspect(args) -> int:
    import pyconv

    ckpt = pyconv.open(args.path)
    summary = ckpt.summary()
    if args.tensors or args.json:
        summary["tensor_list"] = [{"name": n, "dtype": ckpt.dtype(n), "shape": list(ckpt.shape(n))} for n in ckpt.keys()]
    if args.json:
        print(json.dumps(summary, indent=2))
        return EXIT_OK
    print(f"{summary['path']}")
    print(f"  format:       {summary['format']}")
    print(f"  architecture: {summary['architecture']}")
    print(f"  tensors:      {summary['tensors']}")
    print(f"  bytes:        {summary['total_bytes']:,} ("
          + ", ".join(f"{d} {b:,}" for d, b in sorted(summary["bytes_by_dtype"].items())) + ")")
    if summary["extra_files"]:
        print(f"  other files:  {', '.join(summary['extra_files'])}")
    if "quantization" in summary:
        q = summary["quantization"]
        print(f"  quantization: {q['method']} (declared by {q['declared_by']}"
              + ("" if q["transformable"] else "; resharded HF -> HF as it is, not dequantized") + ")")
    for key in ("family", "tp", "pp", "vpp", "ep", "etp", "iteration", "padded_vocab_size"):
        if key in summary:
            print(f"  {key + ':':<13} {summary[key]}")
    if "args" in summary:
        print("  args:         " + ", ".join(f"{k}={v}" for k, v in summary["args"].items()))
    for note in summary.get("notes", ()):
        print(f"  note:         {note}")
    for t in summary.get("tensor_list", []) if args.tensors else []:
        print(f"    {t['name']:<60} {t['dtype']:<8} {t['shape']}")
    return EXIT_OK


def _target_options(args) -> dict:
    """The target options given on the command line (those not given keep the format's defaults;
    one the target format does not take is refused by the API)."""
    given = dict(tp=args.tp, pp=args.pp, vpp=args.vpp, pipeline_layout=args.pipeline_layout, ep=args.ep,
                 etp=args.etp, megatron_naming=args.megatron_naming, moe_grouped_gemm=args.moe_grouped_gemm,
                 iteration=args.iteration, vocab_divisible_by=args.vocab_divisible_by,
                 first_stage_layers=args.first_stage_layers, last_stage_layers=args.last_stage_layers,
                 max_shard_size=args.max_shard_size)
    return {k: v for k, v in given.items() if v is not None}


def _cmd_reshard(args) -> int:
    import pyconv

    if args.dry_run:
        report = pyconv.reshard(args.src, args.dst, to=args.to, dtype=args.dtype, family=args.family,
                                force=args.force, dry_run=True, source_format=args.source_format,
                                merge_lora=args.merge_lora, language_model=args.language_model,
                                **_target_options(args))
        print(json.dumps(report.plan.to_json(), indent=2) if args.json else report.plan.summary())
        return EXIT_OK
    update, phase, close = _progress_bar(not args.json and sys.stderr.isatty())
    try:
        report = pyconv.reshard(args.src, args.dst, to=args.to, dtype=args.dtype, family=args.family,
                                force=args.force, threads=args.threads, source_format=args.source_format,
                                progress=update, phase=phase, device=args.device, merge_lora=args.merge_lora,
                                language_model=args.language_model, **_target_options(args))
    finally:
        close()
    if os.environ.get("RANK", "0") != "0":
        return EXIT_OK  # under torchrun, rank 0 reports for all
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        stored = report.plan.tensor_count if report.plan is not None else report.tensors
        print(f"wrote {report.destination}: {report.files} files, {report.tensors} tensors"
              + (f" (stored as {stored})" if stored != report.tensors else "")
              + f", {report.bytes:,} bytes in {report.seconds:.2f} s ({report.gb_per_s:.2f} GB/s)")
        for note in report.plan.notes if report.plan is not None else ():
            print(f"note: {note}")
    return EXIT_OK


def _cmd_lora(args) -> int:
    from pyconv.lora_layout import convert_adapter

    plan = convert_adapter(args.src, args.dst, to=args.to, base=args.base, tp=args.tp, force=args.force)
    print(f"wrote {os.path.abspath(args.dst)}: {len(plan.files)} files, {plan.model_tensors} tensors")
    for note in plan.notes:
        print(f"  note: {note}")
    return EXIT_OK


def _cmd_verify(args) -> int:
    import pyconv

    report = pyconv.verify(args.a, args.b, atol=args.atol, rtol=args.rtol, threads=args.threads, family=args.family)
    print(json.dumps(report.to_json(), indent=2) if args.json else report.summary())
    return EXIT_OK if report.equal else EXIT_MISMATCH


def _cmd_demo(args) -> int:
    from pyconv.demo import run_demo

    return run_demo(args.workdir)


@contextmanager
def _signals_stop_the_command():
    """SIGTERM and SIGHUP stop any command like Ctrl-C does (exit 130, one line), not only the copy
    phase (execute.py handles that phase itself): reading headers and planning can take seconds."""
    from pyconv.errors import Cancelled

    def handler(signum, frame):
        raise Cancelled(f"interrupted by signal {signal.Signals(signum).name}")

    previous = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            previous[sig] = signal.signal(sig, handler)
    except (ValueError, AttributeError):  # not the main thread, or no such signal on this platform
        pass
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def main(argv: list[str] | None = None) -> int:
    from pyconv.errors import Cancelled, PyconvError

    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # bare `pyconv`: what it does and its commands
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    command = {"inspect": _cmd_inspect, "reshard": _cmd_reshard, "verify": _cmd_verify, "lora": _cmd_lora,
               "demo": _cmd_demo}[args.command]
    try:
        with _signals_stop_the_command():
            return command(args)
    except Cancelled as e:
        print(f"pyconv: stopped: {_one_line(str(e))}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("pyconv: stopped: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except PyconvError as e:
        print(f"pyconv: error: {_one_line(str(e))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
