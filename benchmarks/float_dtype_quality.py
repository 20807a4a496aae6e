"""What storing the float parts of a palettized model in 16 bits costs: perplexity of one palettized model with its
float parts (the tied embedding / lm_head, norms) in float32, float16 and bfloat16 (``EDKMConfig.float_dtype``).

The source is a palettized checkpoint whose float parts are float32: ``--model-dir`` (saved with
``float_dtype="float32"``), or by default the main job's layout (3-bit, one LUT per output channel, no scale:
``optimum_edkm.pipeline.DEFAULT_LAYOUT``) from k-means without training, built once like ``inference.py``'s
``job-f32`` row. Each 16-bit variant is what ``palettize`` makes of it (:func:`optimum_edkm.nn.stored16.
store_float_parts_16bit`), computed in float32. Scored on the validation texts (help topics' validation split,
news) to choose, and on the test texts (help topics' test split, Wikipedia) to report: the first
``--eval-tokens`` tokens of each, 512-token windows. Also scores the float model itself with its embedding and
norms rounded the same way (the effect without palettization).

    python benchmarks/float_dtype_quality.py                 # ~5 min on 2 busy cores

Writes ``benchmarks/results/float_dtype_quality.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

DTYPES = ("float32", "float16", "bfloat16")


def texts(tokenizer, eval_tokens: int) -> dict:
    """``{label: token ids}``: the validation texts (choosing) and the test texts (reporting)."""
    from common import validation_texts

    from optimum_edkm.data import DEFAULT_TEXT, OOD_TEST_TEXT, TEST_SPLIT, load_text

    _, validation = validation_texts(tokenizer, eval_tokens)
    test = {"in_domain": load_text(DEFAULT_TEXT, split=TEST_SPLIT), "out_of_domain": load_text(OOD_TEST_TEXT)}
    ids = {f"validation/{role}": tokens for role, tokens in validation.items()}
    ids.update({f"test/{role}": text.token_ids(tokenizer)[:eval_tokens] for role, text in test.items()})
    return ids


def float_model_in(dtype: str, model):
    """The float model with its embedding / lm_head and norms rounded to ``dtype`` (its linears untouched)."""
    import torch

    from optimum_edkm.nn.stored16 import STORED_16BIT

    if dtype != "float32":
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "embed" in name or "norm" in name:
                    parameter.copy_(parameter.to(STORED_16BIT[dtype]))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=None, help="palettized checkpoint with float32 float parts")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument(
        "--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "optimum_edkm", "bench_inference")
    )
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "float_dtype_quality.json"))
    args = parser.parse_args()

    import torch
    from common import load_average, machine, validation_perplexities, write_json
    from inference import CONFIGS, build_checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_edkm.models import load_causal_lm
    from optimum_edkm.nn.stored16 import STORED_16BIT, store_float_parts_16bit

    source = args.model_dir or build_checkpoint(CONFIGS["job-f32"], args.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(source)
    ids = texts(tokenizer, args.eval_tokens)
    rows, started, load_start = [], time.time(), load_average()
    for dtype in DTYPES:
        model = AutoModelForCausalLM.from_pretrained(source).eval()
        config = model.config.quantization_config
        if config.float_dtype not in ("float32", None):
            raise SystemExit(f"{source} stores its float parts in {config.float_dtype}: give a float32 source")
        if dtype != "float32":
            store_float_parts_16bit(model, STORED_16BIT[dtype])
        rows.append({"model": "palettized", "float_dtype": dtype, **validation_perplexities(model, ids)})
        del model
    for dtype in DTYPES:
        model = float_model_in(dtype, load_causal_lm(dtype=torch.float32)[0].eval())
        rows.append({"model": "float", "float_dtype": dtype, **validation_perplexities(model, ids)})
        del model
    labels = list(ids)
    print(f"\n| model | float parts | {' | '.join(labels)} | max change vs float32 |")
    print("|---" * (3 + len(labels)) + "|")
    for row in rows:
        base = next(r for r in rows if r["model"] == row["model"] and r["float_dtype"] == "float32")
        row["relative_change"] = {label: row[label] / base[label] - 1 for label in labels}
        change = max(abs(value) for value in row["relative_change"].values())
        cells = " | ".join(f"{row[label]:.4f}" for label in labels)
        print(f"| {row['model']} | {row['float_dtype']} | {cells} | {100 * change:.3f}% |")
    write_json(
        args.out,
        {
            "command": "python benchmarks/float_dtype_quality.py " + " ".join(sys.argv[1:]),
            "source": source,
            "eval_tokens": {label: int(tokens.numel()) for label, tokens in ids.items()},
            "rows": rows,
            "machine": machine(torch.device("cpu")),
            "load_average_start": load_start,
            "load_average_end": load_average(),
            "wall_seconds": round(time.time() - started, 1),
        },
    )


if __name__ == "__main__":
    main()
