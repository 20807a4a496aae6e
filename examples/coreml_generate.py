"""Generate text on a Mac with a Core ML generation package of a palettized model (macOS 15 / iOS 18 or later).

Export once (Linux or macOS), from a model saved with ``optimum_edkm.save_pretrained`` (e.g. by
``examples/compress.py``, ``optimum-edkm compress``); the tokenizer is read from the same folder:

    optimum-edkm-coreml runs/compress-example runs/smollm2-3bit-gen.mlpackage --generate --context-length 512
    python examples/coreml_generate.py runs/smollm2-3bit-gen.mlpackage --model runs/compress-example \\
        --prompt "What is a Python decorator?"

The package holds the KV cache as Core ML states: the prompt goes through it in one call (prefill), then each new
token in one call (decode), all on one ``MLState``. Decoding is greedy. ``--compare`` also runs the palettized
torch model (``model.generate``) and reports where the two token streams first differ (Core ML computes in fp16,
torch in fp32, so a late divergence between near-tied tokens is possible).

Core ML runs only on macOS; elsewhere this script exits with status 2 (verify the package on Linux with
``optimum-edkm-coreml verify PACKAGE --model SAVED_DIR``).
"""

from __future__ import annotations

import argparse
import sys
import time

COMPUTE_UNITS = {"all": "ALL", "cpu": "CPU_ONLY", "gpu": "CPU_AND_GPU", "ane": "CPU_AND_NE"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="greedy text generation with a Core ML generation package")
    parser.add_argument("package", help="the .mlpackage written by optimum-edkm-coreml ... --generate")
    parser.add_argument("--model", required=True, help="the saved model folder (its tokenizer is used)")
    parser.add_argument("--prompt", default="What is a Python list comprehension?")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--no-chat-template", action="store_true", help="feed the prompt as plain text")
    parser.add_argument("--compute-units", choices=sorted(COMPUTE_UNITS), default="all")
    parser.add_argument("--compare", action="store_true", help="also generate with the torch model and compare")
    args = parser.parse_args(argv)
    if sys.platform != "darwin":
        print(
            f"error: running a Core ML package needs macOS (this is {sys.platform}); check it here with "
            f"`optimum-edkm-coreml verify {args.package} --model {args.model}`",
            file=sys.stderr,
        )
        return 2

    import coremltools as ct
    from transformers import AutoTokenizer

    from optimum_edkm.export import generate_with_package

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if args.no_chat_template or not tokenizer.chat_template:
        prompt = tokenizer(args.prompt)["input_ids"]
    else:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}], add_generation_prompt=True, return_dict=True
        )["input_ids"]
    start = time.perf_counter()
    mlmodel = ct.models.MLModel(args.package, compute_units=getattr(ct.ComputeUnit, COMPUTE_UNITS[args.compute_units]))
    print(f"loaded {args.package} in {time.perf_counter() - start:.1f} s; prompt of {len(prompt)} tokens\n")

    shown = []

    def show(token: int) -> None:  # stream the text as it is decoded
        before = tokenizer.decode(shown)
        shown.append(token)
        print(tokenizer.decode(shown)[len(before) :], end="", flush=True)

    start = time.perf_counter()
    tokens = generate_with_package(
        mlmodel, prompt, args.max_new_tokens, eos_token_id=tokenizer.eos_token_id, on_token=show
    )
    seconds = time.perf_counter() - start
    print(f"\n\n{len(tokens)} tokens in {seconds:.2f} s ({len(tokens) / seconds:.1f} tokens/s, prefill included)")

    if args.compare:
        from transformers import AutoModelForCausalLM

        import optimum_edkm  # noqa: F401  registers the "edkm" quantization method
        from optimum_edkm.export.stateful import reference_generate

        model = AutoModelForCausalLM.from_pretrained(args.model).eval()
        expected = reference_generate(model, prompt, args.max_new_tokens, eos_token_id=tokenizer.eos_token_id)
        difference = next((i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b), None)
        if difference is None and len(tokens) == len(expected):
            print(f"torch model.generate: the same {len(tokens)} tokens")
        else:
            at = difference if difference is not None else min(len(tokens), len(expected))
            print(f"torch model.generate differs from new token {at} on: {tokenizer.decode(expected[at:])!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
