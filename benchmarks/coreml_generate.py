"""Core ML generation export of the offline model: greedy tokens of the converted torch graph vs ``generate``,
and (with ``--convert``) the package's size, op counts and verification.

    nice -n 10 python benchmarks/coreml_generate.py                       # 64 greedy tokens, torch only
    nice -n 10 python benchmarks/coreml_generate.py --convert runs/smollm2-3bit-gen.mlpackage --embedding-bits 4

The model is SmolLM2-135M-Instruct palettized without training (``EDKMConfig(bits=3,
enable_per_channel_scale=True)``): the tokens are not meant to be good text, they are what the palettized model
computes, and the three generators must agree on them token for token:

* ``model.generate`` (greedy, the palettized torch model, its own dynamic cache),
* the eager :class:`~optimum_edkm.export.StatefulCausalLM` (the KV cache as two buffers updated in place),
* its ``torch.jit.trace`` (the graph ``ct.convert`` reads).

``--embedding-bits N`` also palettizes the tied embedding / LM head as ONE LUT + packed indices read by both
(a stand-in built here until the core's palettized tied embedding lands: the untied copy's embedding is
clustered with ``embedding_bits`` and ``lm_head`` becomes a palettized linear over the same tensors).

Prints a table and writes JSON (``--out``, default ``benchmarks/results/coreml_generate.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import optimum_edkm  # noqa: E402
import optimum_edkm.models  # noqa: E402
from optimum_edkm.export.common import export_copy, palette_records  # noqa: E402
from optimum_edkm.export.stateful import StatefulCausalLM, greedy_generate, reference_generate, reset_cache, torch_step  # noqa: E402

PROMPT = "Explain in a few sentences what a Python list comprehension is."


def palettized_model(bits: int, embedding_bits):
    model, tokenizer, info = optimum_edkm.models.load_causal_lm()
    # with embedding_bits, the tied embedding is palettized once and the LM head reads its palette
    config = optimum_edkm.EDKMConfig(bits=bits, enable_per_channel_scale=True, embedding_bits=embedding_bits or None)
    optimum_edkm.prepare(model, config)
    optimum_edkm.palettize(model)
    return model.eval(), tokenizer, info


def first_difference(tokens: list, expected: list):
    for index, (a, b) in enumerate(zip(tokens, expected)):
        if a != b:
            return index
    return None if len(tokens) == len(expected) else min(len(tokens), len(expected))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--embedding-bits", type=int, default=0, help="palettize the tied embedding too (0: fp16)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--context-length", type=int, default=256)
    parser.add_argument("--convert", default=None, help="also write this .mlpackage (generation export)")
    parser.add_argument("--target", default="iOS18")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "coreml_generate.json"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    model, tokenizer, info = palettized_model(args.bits, args.embedding_bits)
    messages = [{"role": "user", "content": PROMPT}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    prompt = list(prompt["input_ids"] if isinstance(prompt, dict) else prompt)
    records = palette_records(model)
    rows = []

    start = time.perf_counter()
    expected = reference_generate(model, prompt, args.new_tokens, eos_token_id=None)
    rows.append(("model.generate (palettized torch model)", expected, time.perf_counter() - start))
    wrapper = StatefulCausalLM(export_copy(model, records), args.context_length).eval()
    example = (torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 1, 2, 5))
    traced = torch.jit.trace(wrapper, example, strict=False, check_trace=False)
    reset_cache(traced)
    for label, module in (("StatefulCausalLM (eager)", wrapper), ("StatefulCausalLM traced (converted)", traced)):
        start = time.perf_counter()
        tokens = greedy_generate(torch_step(module), prompt, args.new_tokens, args.context_length)
        rows.append((label, tokens, time.perf_counter() - start))
    del wrapper, traced

    load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else []
    print(
        f"\nSmolLM2-135M-Instruct, {args.bits}-bit palettized (per-channel scale), embedding "
        f"{f'{args.embedding_bits}-bit palettized, tied' if args.embedding_bits else 'fp32, tied'}; prompt "
        f"{len(prompt)} tokens, {args.new_tokens} greedy new tokens; load average {' '.join(load)}\n"
    )
    print("| generator | new tokens | equal to generate | first difference | seconds |")
    print("|---|---|---|---|---|")
    results = []
    for label, tokens, seconds in rows:
        difference = first_difference(tokens, expected)
        print(
            f"| {label} | {len(tokens)} | {'yes' if difference is None else 'NO'} | "
            f"{'-' if difference is None else difference} | {seconds:.1f} |"
        )
        results.append(
            {
                "generator": label,
                "tokens": tokens,
                "equal": difference is None,
                "first_difference": difference,
                "seconds": seconds,
            }
        )
    print(f"\ntext: {tokenizer.decode(expected)!r}")

    package = None
    if args.convert:
        from optimum_edkm.export import to_coreml_generate

        start = time.perf_counter()
        result = to_coreml_generate(
            model,
            args.convert,
            context_length=args.context_length,
            minimum_deployment_target=args.target,
            overwrite=True,
            check_logits=False,
        )
        seconds = time.perf_counter() - start
        report = result.verification
        print("\n" + report.summary())
        print(
            f"\npackage {result.path}: {result.package_bytes:,} B ({result.package_bytes / 1e6:.1f} MB), "
            f"weight.bin {result.weight_bin_bytes:,} B, {seconds:.0f} s to convert and verify"
        )
        print("op counts:", json.dumps(result.op_counts, sort_keys=True))
        package = {
            "path": result.path,
            "package_bytes": result.package_bytes,
            "weight_bin_bytes": result.weight_bin_bytes,
            "op_counts": result.op_counts,
            "target": result.target,
            "spec_version": result.spec_version,
            "seconds": seconds,
            "palettized_payload_bytes": report.palettized_payload_bytes,
            "nbit_payload_bytes": report.nbit_payload_bytes,
            "float_bytes": report.float_bytes,
            "converter_bytes": report.converter_bytes,
            "index_bytes": report.index_bytes,
            "tied_embedding": report.tied_embedding,
            "states": report.states,
            "greedy_tokens_checked": result.greedy_tokens,
            "checks": report.checks,
            "failures": report.failures,
        }

    document = {
        "model": info,
        "bits": args.bits,
        "embedding_bits": args.embedding_bits or None,
        "prompt_tokens": len(prompt),
        "new_tokens": args.new_tokens,
        "context_length": args.context_length,
        "generators": results,
        "package": package,
        "load_average": load,
        "platform": platform.platform(),
        "torch": torch.__version__,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(document, handle, indent=2, default=str)
        handle.write("\n")
    print(f"\nwrote {args.out}")
    return 0 if all(r["equal"] for r in results) and not (package and package["failures"]) else 1


if __name__ == "__main__":
    sys.exit(main())
