"""``optimum-edkm``: the command line without optimum (the same commands as ``optimum-cli edkm`` and
``optimum-cli export coreml-edkm``; every option is declared once, in :mod:`.arguments`).

optimum-edkm compress [--model MODEL] [--bits 3] [--output OUT] [--steps N] [...]   (the main job)
optimum-edkm evaluate OUT [OTHER_MODEL ...] [--eval-tokens N]
optimum-edkm export coreml SAVED_DIR OUT.mlpackage [...]
optimum-edkm export verify PACKAGE --model SAVED_DIR
optimum-edkm-coreml SAVED_DIR OUT.mlpackage [...] | verify PACKAGE --model SAVED_DIR   (the export alone)
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from .arguments import add_compress_arguments, add_coreml_commands, add_evaluate_arguments

logger = logging.getLogger("optimum_edkm.commands")

#: exit status of a command refused for its input (argparse uses 2 as well)
BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optimum-edkm", description="eDKM palettization of Hugging Face LLMs")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{compress,evaluate,export}")
    add_compress_arguments(
        commands.add_parser(
            "compress", help="the main job: post-training start, clustering-aware training, palettize, save, report"
        )
    )
    add_evaluate_arguments(
        commands.add_parser("evaluate", help="perplexity and size of saved models on the same held-out text")
    )
    add_coreml_commands(commands.add_parser("export", help="Core ML export of a saved palettized model"))
    return parser


def build_coreml_parser() -> argparse.ArgumentParser:
    """``optimum-edkm-coreml``: the ``export`` subcommands alone."""
    parser = argparse.ArgumentParser(prog="optimum-edkm-coreml", description="Core ML export of palettized models")
    add_coreml_commands(parser)
    return parser


def configure_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("optimum_edkm").setLevel(logging.INFO)


def run_command(command: str, args: argparse.Namespace) -> int:
    """Run ``compress``, ``evaluate`` or ``export`` for parsed arguments; prints the summary. Returns the exit
    status."""
    if command == "export":
        return run_coreml(args)
    from .compress import CommandError

    configure_logging()
    try:
        if command == "compress":
            from .compress import compress, summary

            print(summary(compress(args)))
        elif command == "evaluate":
            from .evaluate import evaluate_models

            print(evaluate_models(args)["table"])
        else:
            raise ValueError(f"unknown command {command!r}")
    except (CommandError, FileNotFoundError, ModuleNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return BAD_INPUT
    return 0


def run_coreml(args: argparse.Namespace) -> int:
    """Core ML export or verification (``args.coreml_command``), with the export's exit codes."""
    from optimum_edkm.export.cli import run

    return run(args)


def main(argv: Optional[list] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    return run_command(args.command, args)


def coreml_main(argv: Optional[list] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in ("coreml", "export", "verify", "-h", "--help"):
        argv.insert(0, "coreml")  # the short form: SAVED_DIR OUT.mlpackage
    elif argv and argv[0] == "export":
        argv[0] = "coreml"  # 0.2's name of the subcommand
    return run_coreml(build_coreml_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
