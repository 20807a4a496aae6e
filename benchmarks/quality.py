#!/usr/bin/env python
"""Quality benchmark: perplexity of RTN / GPTQ / AWQ (and any registered method) at equal effective bits.

    python benchmarks/quality.py --quick             # smoke test, 3-bit, ~2k evaluation tokens
    python benchmarks/quality.py                      # full run: 2/3/4 bits on the default offline model
    python benchmarks/quality.py --text my_corpus/ --bits 3 --methods gptq awq

Outputs go to benchmarks/results/quality.json, docs/quality_table.md and docs/quality.png of this repository
(``_quick`` suffix with ``--quick``). The harness lives in :mod:`optimum_edkm.evaluation.quality`; add rows with
``register_method(name, callable(model, bits, group_size, calibration) -> QuantizationReport)``.
"""

import sys
from pathlib import Path

from optimum_edkm.evaluation.quality import main

REPOSITORY = Path(__file__).resolve().parent.parent

if __name__ == "__main__":
    sys.exit(main(["--output-root", str(REPOSITORY)] + sys.argv[1:]))
