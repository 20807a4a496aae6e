"""Post-training palettization rows for the quality benchmark (``optimum_edkm.ptq``: GPTQ onto LUTs).

Importing this module registers, next to the rows of ``quality_methods.py``:

* ``ptq-scaled`` - one LUT per tensor with an fp16 scale per output channel;
* ``ptq-g16`` - one LUT per 16 output rows with the scale;
* ``ptq-channel`` - one LUT per output row, no scale.

Each calibrates on the benchmark's calibration windows (the same ones GPTQ and AWQ get) plus, when the run's recipe
has teacher text, as many windows of it (``ptq_sweep.py --calibration mixed``), with act-order and one
least-squares LUT refit, then palettizes (no fine-tuning). To add the rows, import this module in ``quality.py``
after ``quality_methods`` (``import ptq_methods  # noqa: F401``).
"""

from __future__ import annotations

import time
from typing import Optional

import torch
from quality_methods import QuantizationReport, register_method


def _post_training(lut_group_size: Optional[int], channel_scale: bool):
    def compress(model, bits, group_size, context):
        from optimum_edkm.api import palettize
        from optimum_edkm.config import EDKMConfig
        from optimum_edkm.nn import palettized_storage
        from optimum_edkm.ptq import palettize_post_training

        granularity = (
            {} if lut_group_size is None else {"granularity": "per_grouped_channel", "group_size": lut_group_size}
        )
        config = EDKMConfig(
            bits=bits, enable_per_channel_scale=channel_scale, temperature=context.recipe.temperature, **granularity
        )
        calibration = context.calibration.input_ids
        teacher = context.teacher_text(model)
        if teacher is not None:
            # teacher rows joined and cut to the calibration windows' length, as many rows as the text gets
            length = calibration.shape[1]
            stream = teacher.reshape(-1)[: (teacher.numel() // length) * length]
            calibration = torch.cat([calibration, stream.view(-1, length)[: calibration.shape[0]]])
        started = time.perf_counter()
        result = palettize_post_training(model, calibration, config, act_order=True, progress=False)
        palettize(model)
        settings = dict(result.settings, lut_group_size=lut_group_size, per_channel_scale=channel_scale)
        errors = [d["output_error"] for d in result.details.values()]
        details = {"output_error_sum": {k: sum(e[k] for e in errors) for k in errors[0]}} if errors else {}
        return QuantizationReport(
            "ptq", bits, lut_group_size, palettized_storage(model), time.perf_counter() - started, settings, details
        )

    return compress


register_method("ptq-scaled", _post_training(None, channel_scale=True))
register_method("ptq-g16", _post_training(16, channel_scale=True))
register_method("ptq-channel", _post_training(1, channel_scale=False))
