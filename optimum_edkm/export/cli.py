"""``optimum-edkm-coreml`` / ``python -m optimum_edkm.export``: export a saved palettized model to Core ML, or
verify an export.

    optimum-edkm-coreml SAVED_DIR OUT.mlpackage [--seq-len 64] [--target iOS18] [--batch-size 1]
                        [--capture trace|export] [--overwrite] [--no-manifest] [--no-tensors] [--no-logits-check]
    optimum-edkm-coreml SAVED_DIR OUT.mlpackage --generate [--context-length 512] [--target iOS18] ...
    optimum-edkm-coreml verify OUT.mlpackage --model SAVED_DIR [--no-logits-check]
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from .errors import CoreMLExportError, VerificationError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="optimum-edkm-coreml", description="Core ML export of optimum-edkm palettized models"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="convert a saved palettized model to an .mlpackage")
    export.add_argument("model", help="directory of a model saved by optimum_edkm.save_pretrained after palettize")
    export.add_argument("output", help="the .mlpackage to write")
    export.add_argument(
        "--generate",
        action="store_true",
        help="export the stateful generation step (KV cache as Core ML states, prefill and decode; "
        "iOS18+) instead of a fixed window",
    )
    export.add_argument(
        "--context-length",
        type=int,
        default=None,
        help="with --generate: most tokens (prompt + generated) per sequence (default 512, or the "
        "model's max_position_embeddings if smaller)",
    )
    export.add_argument(
        "--seq-len", type=int, default=64, help="without --generate: fixed number of tokens per call (default 64)"
    )
    export.add_argument("--batch-size", type=int, default=1, help="without --generate: fixed batch size")
    export.add_argument(
        "--target",
        default="iOS18",
        help="minimum deployment target: iOS18 (default), macOS15, iOS26, ... or iOS16/iOS17 for "
        "fixed-window exports of per-tensor 1/2/4/6/8-bit models without per-channel scale",
    )
    export.add_argument(
        "--capture",
        choices=("trace", "export"),
        default="trace",
        help="without --generate: torch.jit.trace (default) or torch.export",
    )
    export.add_argument("--overwrite", action="store_true", help="replace an existing package and manifest")
    export.add_argument("--no-manifest", action="store_true", help="do not write <stem>.manifest.json")
    export.add_argument("--no-tensors", action="store_true", help="do not write <stem>.palettized.safetensors")
    export.add_argument(
        "--no-logits-check",
        action="store_true",
        help="skip the logits comparison (the bit-exact weight checks always run)",
    )
    verify = commands.add_parser("verify", help="check an .mlpackage against the saved palettized model")
    verify.add_argument("package", help="the .mlpackage to check")
    verify.add_argument("--model", required=True, help="directory of the saved palettized model")
    verify.add_argument("--manifest", default="auto", help="manifest to check (default: <stem>.manifest.json)")
    verify.add_argument("--no-logits-check", action="store_true")
    return parser


def _load(directory: str):
    from transformers import AutoModelForCausalLM

    from .. import quantizer  # noqa: F401  registers the "edkm" quantization method, needed to load the checkpoint

    return AutoModelForCausalLM.from_pretrained(directory)


def _check_arguments(args) -> None:
    """What can be refused without loading the model."""
    from .common import manifest_path_for, tensors_path_for
    from .targets import resolve_target

    if not os.path.isdir(args.model):
        raise CoreMLExportError(
            f"{args.model} is not a directory: pass the directory written by "
            f"optimum_edkm.save_pretrained(model, directory) after palettize(model)"
        )
    if args.command == "verify":
        return
    resolve_target(args.target)
    if not args.output.endswith(".mlpackage"):
        raise CoreMLExportError(f"the output must be an .mlpackage path, got {args.output!r}")
    outputs = (args.output, manifest_path_for(args.output), tensors_path_for(args.output))
    existing = [path for path in outputs if os.path.exists(path)]
    if existing and not args.overwrite:
        raise CoreMLExportError(f"{existing[0]} already exists; pass --overwrite to replace it")


def _export(args):
    from . import to_coreml, to_coreml_generate

    common = dict(
        minimum_deployment_target=args.target,
        overwrite=args.overwrite,
        manifest=not args.no_manifest,
        tensors=not args.no_tensors,
        check_logits=not args.no_logits_check,
    )
    if args.generate:
        return to_coreml_generate(_load(args.model), args.output, context_length=args.context_length, **common)
    return to_coreml(
        _load(args.model), args.output, seq_len=args.seq_len, batch_size=args.batch_size, capture=args.capture, **common
    )


#: exit codes: 0 verified / exported, 1 the package does not match the model, 2 bad arguments or a model that
#: cannot be exported, 3 the package or its manifest cannot be read (missing weight.bin, cut-off JSON, ...)
EXIT_MISMATCH, EXIT_USAGE, EXIT_MALFORMED = 1, 2, 3


def main(argv: Optional[list] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in ("export", "verify", "-h", "--help"):
        argv.insert(0, "export")  # the short form: SAVED_DIR OUT.mlpackage
    args = _parser().parse_args(argv)
    from . import verify_coreml

    try:
        _check_arguments(args)
        if args.command == "export":
            result = _export(args)
            print(result.verification.summary())
            if result.greedy_tokens is not None:
                print(f"greedy tokens of the converted torch graph = model.generate's: {result.greedy_tokens}")
            print(
                f"wrote {result.path} ({result.package_bytes:,} B)"
                + (f", {result.manifest_path}" if result.manifest_path else "")
                + (f", {result.tensors_path}" if result.tensors_path else "")
            )
        else:
            manifest = None if args.manifest == "none" else args.manifest
            report = verify_coreml(
                args.package, _load(args.model), manifest=manifest, check_logits=not args.no_logits_check
            )
            print(report.summary())
    except VerificationError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_MALFORMED if error.malformed else EXIT_MISMATCH
    except (CoreMLExportError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    return 0
