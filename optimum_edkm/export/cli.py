"""What the Core ML commands run (``optimum-edkm export coreml|verify``, ``optimum-cli export coreml-edkm``,
``optimum-edkm-coreml``): :func:`run` takes the options parsed by ``optimum_edkm.commands.arguments`` (the one
place they are declared), refuses what it can before loading the model, exports or verifies, and returns the
exit status."""

from __future__ import annotations

import os
import sys

from .errors import CoreMLExportError, VerificationError


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
    if args.coreml_command == "verify":
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


def run(args) -> int:
    """Export (``args.coreml_command == "export"``) or verify; prints the summary; returns the exit status."""
    from . import verify_coreml

    try:
        _check_arguments(args)
        if args.coreml_command == "export":
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
