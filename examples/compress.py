"""Compress a causal LM to 3 bits with optimum-edkm and measure what it costs, in and out of domain.

The main job (README command 1), in the library's own calls: load the model and the texts, build a
:class:`~optimum_edkm.pipeline.CompressionData`, call :func:`optimum_edkm.compress` with the default layout (one
8-entry LUT per output channel) and recipe (the post-training start - GPTQ onto LUTs calibrated on the training
text and the float model's own samples - then clustering-aware training, chosen on validation text:
docs/quality.md), print the report and save the palettized model. ``optimum-edkm compress`` runs the same job
with every option on the command line.

    python examples/compress.py                       # the main job on the offline SmolLM2-135M-Instruct
    python examples/compress.py --steps 0             # the post-training start alone
    python examples/compress.py --model HuggingFaceTB/SmolLM2-135M --bits 4 --output smollm2-4bit

Scored on the first 8,192 tokens of two held-out texts: the help topics' test split (in domain: the training
text's kind) and Wikipedia articles from the gensim wheel (out of domain: nothing was tuned on it).
"""

import argparse
import json

import optimum_edkm
from optimum_edkm import EDKMConfig, atomic
from optimum_edkm.data import OOD_TEST_TEXT, TEST_SPLIT, TRAIN_SPLIT, load_text
from optimum_edkm.models import DEFAULT_MODEL_CAVEAT, load_causal_lm
from optimum_edkm.pipeline import DEFAULT_LAYOUT, DEFAULT_RECIPE, CompressionData, recipe_with


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Hub id or local folder (default: offline SmolLM2-135M)")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"end-to-end steps (default {DEFAULT_RECIPE.steps}; 0 alone: the post-training start)",
    )
    parser.add_argument("--block-epochs", type=int, default=None, help=f"default {DEFAULT_RECIPE.block_epochs}")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--output", default="runs/compress-example", help="where the palettized model is saved")
    args = parser.parse_args()

    model, tokenizer, info = load_causal_lm(args.model)
    train = load_text(split=TRAIN_SPLIT)
    held_out = {"in-domain": load_text(split=TEST_SPLIT), "out-of-domain": load_text(OOD_TEST_TEXT)}
    print(f"model: {info['name']} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters)")
    if args.model is None:
        print(f"note: {DEFAULT_MODEL_CAVEAT}")
    for role, text in {"training": train, **held_out}.items():
        print(f"{role} text: {json.dumps(text.describe())}")

    recipe = recipe_with({"steps": args.steps, "block_epochs": args.block_epochs})
    data = CompressionData(
        train_ids=train.token_ids(tokenizer),
        tokenizer=tokenizer,
        evaluation={role: text.token_ids(tokenizer, max_tokens=args.eval_tokens) for role, text in held_out.items()},
    )
    report = optimum_edkm.compress(model, EDKMConfig(bits=args.bits, **DEFAULT_LAYOUT), recipe, data)

    print(report.table())
    for row in range(1, len(report.rows)):
        ratios = ", ".join(f"{role} {ratio:.3f}x" for role, ratio in report.ratios(row).items())
        print(f"{report.rows[row].label}: {ratios} the float model's perplexity")
    size = report.size
    print(
        f"palettized model: {size['theoretical_bytes'] / 2**20:.1f} MiB ({size['bits_per_clustered_weight']:.3f} bits "
        f"per clustered weight, {size['bits_per_weight']:.2f} bits per parameter overall, "
        f"{100 * size['float_parameter_share']:.1f}% of the parameters in floating point); "
        f"{report.seconds:.0f} s: " + ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in report.stages.items())
    )
    saved = optimum_edkm.save_pretrained(model, args.output)
    tokenizer.save_pretrained(saved)
    atomic.write_json(f"{saved}/compress_report.json", report.as_dict(), default=str)
    print(f"saved to {saved} (load with from_pretrained after import optimum_edkm)")


if __name__ == "__main__":
    main()
