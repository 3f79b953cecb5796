"""The ``moefx`` command: ``convert``, ``inspect``, ``export`` and ``bench``.

Exit codes: 0 done; 1 the conversion failed (the model file, capture, nothing to convert...);
2 a usage error (bad option, missing file, output exists); 130 interrupted. A failure prints
one line on stderr naming the problem and the fix, and writes nothing; ``--debug`` adds the
traceback and the passes' debug log.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback

from moefx.cli.checks import CLIError
from moefx.exporting import FORMATS
from moefx.init.router_init import ROUTER_INITS
from moefx.init.strategies import INIT_STRATEGIES
from moefx.layer.config import GATES

DTYPES = ("float32", "float16", "bfloat16")
CONVERT_FORMATS = ("moefx", "hf")
EXPORT_FORMATS = (*FORMATS, "hf")  # hf: moefx.artifact.hf_native, not a torch.export program


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (exit 2) instead of usage + error."""

    def error(self, message: str):
        raise CLIError(f"{message} (see {self.prog} --help)", code=2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moefx", description="Turn the feed-forward blocks of a PyTorch model into MoE layers.")
    parser.add_argument("--version", action=_PrintVersion)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    convert = commands.add_parser("convert", help="convert a model file's or a checkpoint's FFNs to MoE and write the result")
    convert.add_argument("model_py", metavar="SOURCE", help="a Python file defining build_model() (or model) and example_inputs(), "
                         "a transformers checkpoint directory, or a hub id in the local Hugging Face cache")
    _conversion_options(convert)
    convert.add_argument("--calibration", metavar="FILE",
                         help="--router-init kmeans: token ids (.safetensors, .pt, or a .txt of integers) or text "
                              "(a .txt, tokenised with the checkpoint's tokenizer) to cluster hidden states on "
                              "(default: the example inputs)")
    convert.add_argument("--dtype", choices=DTYPES, help="cast the model to this dtype before converting (default: as built)")
    convert.add_argument("--format", default="moefx", type=_choice("--format", CONVERT_FORMATS), metavar="{moefx,hf}",
                         help="moefx: read back with moefx.load; hf: a native transformers MoE checkpoint (default moefx)")
    convert.add_argument("--max-shard-size", metavar="SIZE", help="largest weight file, e.g. 5GB or 500MiB (default: one file)")
    convert.add_argument("--batch", type=_int("--batch"), default=1, metavar="B",
                         help="a checkpoint's example inputs: B sequences of token ids (default 1)")
    convert.add_argument("--seq-len", type=_int("--seq-len"), default=16, metavar="T",
                         help="a checkpoint's example inputs: T tokens each (default 16)")
    convert.add_argument("--seed", type=_int("--seed"), default=0, metavar="S",
                         help="seeds each layer's random parts (router, drop-upcycle) with S and its path (default 0)")
    convert.add_argument("-o", "--out", metavar="DIR", help="output directory (default: ./<model file name>-moefx)")
    convert.add_argument("--dry-run", action="store_true", help="find and plan, write nothing")
    convert.add_argument("--force", action="store_true", help="replace an existing output directory")
    _common(convert)

    inspect = commands.add_parser("inspect", help="show a model's FFN candidates and the graph of one MoE layer")
    inspect.add_argument("target", metavar="MODEL_PY|OUT_DIR", help="a model file, or a moefx convert output directory")
    _conversion_options(inspect)
    inspect.add_argument("--layer", metavar="PATH", help="the MoE layer whose graph to show (default: the first)")
    inspect.add_argument("--full", action="store_true", help="show alike layers one by one, and every graph step")
    _common(inspect)

    export = commands.add_parser("export", help="export a moefx convert output for deployment (pt2, AOTInductor, TensorRT, "
                                 "native transformers MoE)")
    export.add_argument("out_dir", metavar="OUT_DIR", help="a moefx convert output directory")
    export.add_argument("--format", default="pt2", type=_choice("--format", EXPORT_FORMATS), metavar="{" + ",".join(EXPORT_FORMATS) + "}",
                        help="pt2: torch.export program; aoti: AOTInductor package; tensorrt: Torch-TensorRT; hf: a native "
                             "transformers MoE checkpoint, e.g. Llama -> Mixtral (default pt2)")
    export.add_argument("-o", "--output", metavar="FILE", help="where to write (default: OUT_DIR/model[.aoti|.trt].pt2; "
                        "for hf a directory, OUT_DIR/hf)")
    export.add_argument("--max-shard-size", metavar="SIZE", help="--format hf: largest weight file, e.g. 5GB or 500MB (default 5GB)")
    export.add_argument("--device", default="cpu", help="device to export for (tensorrt needs cuda; default cpu)")
    export.add_argument("--force", action="store_true", help="replace an existing file")
    _common(export)

    # Listed for --help; main() hands `moefx bench ...` to the benchmark's own parser.
    commands.add_parser("bench", help="time one MoE layer against transformers and a dense limit (moefx bench --help)")
    return parser


class _PrintVersion(argparse.Action):
    """``--version``: moefx's version and the torch and Triton it runs on, the first line of a bug
    report (Triton is imported only here: it adds 0.2 s to every command)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="print the versions of moefx, torch and Triton, and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        import torch

        import moefx

        try:
            import triton
            triton_version = triton.__version__
        except ImportError:
            triton_version = "not installed"
        print(f"moefx {moefx.__version__} (torch {torch.__version__}, triton {triton_version})")
        parser.exit()


def _conversion_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experts", type=_int("--experts"), default=8, metavar="N", help="experts per MoE layer, >= 2 (default 8)")
    p.add_argument("--top-k", type=_int("--top-k"), metavar="K", help="experts per token, 1..N (default 2; 1 for --gate switch)")
    p.add_argument("--init", default="upcycle", type=_choice("--init", INIT_STRATEGIES), metavar="{" + ",".join(INIT_STRATEGIES) + "}")
    p.add_argument("--router-init", type=_choice("--router-init", ROUTER_INITS), metavar="{" + ",".join(ROUTER_INITS) + "}",
                   help="where routers start: random, weights (from each expert's own rows), kmeans (centroids of "
                        "hidden states); default weights for --init split, else random")
    p.add_argument("--gate", default="topk", type=_choice("--gate", GATES), metavar="{" + ",".join(GATES) + "}")
    p.add_argument("--capacity-factor", type=_float("--capacity-factor"), metavar="F", help="> 0; default: dropless")
    p.add_argument("--expert-groups", type=_int("--expert-groups"), default=1, metavar="G",
                   help="--gate sigmoid: split the experts into G equal groups (default 1)")
    p.add_argument("--topk-groups", type=_int("--topk-groups"), metavar="G",
                   help="--gate sigmoid: each token picks experts from its G best groups (default: all)")
    p.add_argument("--bias-update-rate", type=_float("--bias-update-rate"), default=0.0, metavar="R",
                   help="--gate sigmoid: step of moefx.update_routing_bias, loss-free balancing (default 0: off)")
    p.add_argument("--include", action="append", metavar="GLOB", help="convert only FFNs whose module path matches (repeatable)")
    p.add_argument("--exclude", action="append", metavar="GLOB", help="do not convert FFNs whose path matches (repeatable)")
    p.add_argument("--every", type=_int("--every"), default=1, metavar="N", help="convert every N-th FFN (default 1: all)")
    p.add_argument("--entry", metavar="NAME", help="the builder in the model file (default: build_model, then model)")


def typed_conversion_options(argv: list[str]) -> list[str]:
    """The conversion options typed in ``argv`` (a default typed out counts), as flags."""
    typed = _Parser(add_help=False)
    _conversion_options(typed)
    for action in typed._actions:
        action.default = argparse.SUPPRESS
    known, _ = typed.parse_known_args(argv)
    return ["--" + name.replace("_", "-") for name in vars(known)]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON for machines instead of tables")
    p.add_argument("--debug", action="store_true", help="show tracebacks and the passes' log")


def _number(flag: str, kind: type, what: str):
    """An argparse type whose error names the flag (argparse's own says "invalid int value")."""
    def parse(text: str):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be {what}, got {text!r}") from None
    return parse


def _int(flag: str):
    return _number(flag, int, "an integer")


def _float(flag: str):
    return _number(flag, float, "a number")


def _choice(flag: str, choices):
    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"{flag} {text!r} is unknown: choose one of {', '.join(choices)}")
        return text
    return parse


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, handlers=[_log_handler()], force=True)
    if not debug:  # torch logs the export failures that capture recovers from, or reports in one line
        logging.getLogger("torch").setLevel(logging.CRITICAL)
    try:
        if argv[:1] == ["bench"]:  # every option belongs to the benchmark's own parser
            from moefx.cli.bench import main as bench_main

            return bench_main(argv[1:], prog="moefx bench")
        args = build_parser().parse_args(argv)
        if args.command == "inspect":  # an output directory takes none: they are refused by name
            args.typed_conversion_options = typed_conversion_options(argv[1:])
        if args.command is None:
            raise CLIError("no command given: use moefx convert, moefx inspect, moefx export or moefx bench (see moefx --help)", code=2)
        return _run(args)
    except CLIError as err:
        return _fail(str(err), err.code, debug)
    except KeyboardInterrupt:
        return _fail("interrupted; nothing written", 130, debug)
    except Exception as err:  # a failure of moefx itself: still one line, the traceback with --debug
        return _fail(f"{type(err).__name__}: {err}", 1, debug)


def _run(args: argparse.Namespace) -> int:
    if args.command == "convert":
        from moefx.cli.convert import run_convert

        return run_convert(args)
    if args.command == "export":
        from moefx.cli.export import run_export

        return run_export(args)
    from moefx.cli.inspection import run_inspect

    return run_inspect(args)


def _fail(message: str, code: int, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    one_line = ""
    for part in filter(None, (line.strip() for line in message.strip().splitlines())):
        one_line += part if not one_line else (" " if one_line.endswith(":") else "; ") + part
    print(f"moefx: error: {one_line}", file=sys.stderr)
    return code


def _log_handler() -> logging.Handler:
    from rich.logging import RichHandler

    from moefx.cli.views import make_console

    return RichHandler(console=make_console(stderr=True), show_path=False)
