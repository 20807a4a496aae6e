"""``optimum-edkm``: the command line without optimum (the same commands as ``optimum-cli edkm``).

optimum-edkm compress --model MODEL --bits 3 --output OUT [--steps N] [...]
optimum-edkm evaluate OUT [OTHER_MODEL ...] [--eval-tokens N]
optimum-edkm export coreml SAVED_DIR OUT.mlpackage [...]      (also: export verify PACKAGE --model SAVED_DIR)
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from .arguments import add_compress_arguments, add_evaluate_arguments

logger = logging.getLogger("optimum_edkm.commands")

#: exit status of a command refused for its input (argparse uses 2 as well)
BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optimum-edkm", description="eDKM palettization of Hugging Face LLMs")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{compress,evaluate,export}")
    add_compress_arguments(
        commands.add_parser("compress", help="load, fine-tune with eDKM, palettize, save; report size and perplexity")
    )
    add_evaluate_arguments(
        commands.add_parser("evaluate", help="perplexity and size of saved models on the same held-out text")
    )
    commands.add_parser(
        "export",
        help="export coreml SAVED_DIR OUT.mlpackage [...]: Core ML export "
        "(python -m optimum_edkm.export --help lists the options)",
        add_help=False,
    )
    return parser


def configure_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("optimum_edkm").setLevel(logging.INFO)


def run_command(command: str, args: argparse.Namespace) -> int:
    """Run ``compress`` or ``evaluate`` for parsed arguments; prints the summary table. Returns the exit status."""
    from .compress import CommandError

    configure_logging()
    try:
        if command == "compress":
            from .compress import compress

            report = compress(args)
            print(report["table"])
            size = report["size"]
            print(
                f"\nsaved to {report['output']}: {report['checkpoint']['file_bytes'] / 2**20:.1f} MiB on disk, "
                f"{size['bits_per_clustered_weight']:.3f} bits per clustered weight, "
                f"{size['bits_per_weight']:.2f} bits per parameter overall; report in compress_report.json "
                f"({report['seconds']['total']:.0f} s)"
            )
        elif command == "evaluate":
            from .evaluate import evaluate_models

            print(evaluate_models(args)["table"])
        else:
            raise ValueError(f"unknown command {command!r}")
    except (CommandError, FileNotFoundError, ModuleNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return BAD_INPUT
    return 0


def run_coreml_export(argv: list) -> int:
    """``export coreml ...`` / ``export coreml-edkm ...``: handed to ``optimum_edkm.export.cli``."""
    from optimum_edkm.export.cli import main as export_main

    return export_main(argv)


def main(argv: Optional[list] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "export":
        rest = argv[1:]
        if rest and rest[0] in ("coreml", "coreml-edkm"):
            return run_coreml_export(rest[1:])
        if rest and rest[0] == "verify":
            return run_coreml_export(rest)
        print(
            "usage: optimum-edkm export coreml SAVED_DIR OUT.mlpackage [options]\n"
            "       optimum-edkm export verify PACKAGE --model SAVED_DIR\n"
            "(python -m optimum_edkm.export --help lists the options)",
            file=sys.stderr,
        )
        return BAD_INPUT
    args = build_parser().parse_args(argv)
    return run_command(args.command, args)


if __name__ == "__main__":
    sys.exit(main())
