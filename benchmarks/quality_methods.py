"""The rows of the quality benchmark: how each method compresses a fresh copy of the model.

A method is ``callable(model, bits, group_size, context) -> QuantizationReport``; it compresses ``model`` in
place. ``context`` (:class:`RunContext`) holds the calibration text and windows and the recipe, computed once.
Every optimum-edkm row is one call of :func:`optimum_edkm.compress` (the main job's pipeline) with a LUT layout
and a recipe; :func:`register_method` adds a row.

Row names: ``<method>-<layout>``. Methods: ``kmeans`` (plain k-means, no training), ``skm`` (k-means weighted by the
float model's Fisher diagonal), ``ptq`` (GPTQ onto LUTs, the post-training start), ``edkm`` (the run's recipe:
post-training start, then its training stages). Layouts: ``tensor`` (one fp16 LUT per weight), ``scaled`` (the
same plus an fp16 scale per output channel), ``g16`` (one LUT per 16 output rows plus the scale), ``channel`` (one
LUT per output row, no scale: the main job's).
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from typing import Callable, Optional

import torch

from optimum_edkm.data import TextData, sample_windows
from optimum_edkm.pipeline import DEFAULT_RECIPE, CompressionData, Recipe


@dataclasses.dataclass
class CalibrationData:
    """Tokenised calibration text, as every compression method in the benchmark receives it.

    Attributes:
        input_ids: ``[n_samples, seq_len]`` calibration windows (GPTQ / AWQ use these; with a recipe that mixes
            teacher text, the same windows optimum-edkm's rows calibrate on).
        token_ids: the whole calibration text as one token stream (for methods that train on more).
        text: the calibration text itself.
        tokenizer: the tokenizer that produced the ids.
        seed: the seed that drew the windows.
    """

    input_ids: torch.Tensor
    token_ids: torch.Tensor
    text: TextData
    tokenizer: object
    seed: int

    def describe(self) -> dict:
        record = self.text.describe(tokens=self.token_ids.numel())
        record.update(samples=int(self.input_ids.shape[0]), seq_len=int(self.input_ids.shape[1]), seed=self.seed)
        return record


def calibration_data(text: TextData, tokenizer, n_samples: int, seq_len: int, seed: int = 0) -> CalibrationData:
    """Tokenise ``text`` and draw ``n_samples`` x ``seq_len`` seeded calibration windows from it."""
    token_ids = text.token_ids(tokenizer)
    return CalibrationData(
        input_ids=sample_windows(token_ids, n_samples, seq_len, seed),
        token_ids=token_ids,
        text=text,
        tokenizer=tokenizer,
        seed=seed,
    )


@dataclasses.dataclass
class QuantizationReport:
    """What a compression method did to a model, as the benchmark records it.

    Attributes:
        method: registry name (``"rtn"``, ``"gptq"``, ...).
        bits: index / code width (``None`` for an uncompressed row).
        group_size: the method's grouping (``None``: per channel / per tensor, as the method defines it).
        storage: per compressed module (``named_modules`` name), its
            :class:`~optimum_edkm.storage.WeightStorage`; feeds :func:`~optimum_edkm.evaluation.effective_bits`.
        seconds: wall-clock time of the compression.
        settings: the method's hyper-parameters.
        details: method-specific diagnostics (per-module errors, stage times, training losses, ...).
    """

    method: str
    bits: Optional[int]
    group_size: Optional[int]
    storage: dict
    seconds: float
    settings: dict = dataclasses.field(default_factory=dict)
    details: dict = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "method": self.method,
            "bits": self.bits,
            "group_size": self.group_size,
            "seconds": self.seconds,
            "settings": self.settings,
            "compressed_modules": len(self.storage),
            "schemes": sorted({s.scheme for s in self.storage.values()}),
            "details": self.details,
        }


@dataclasses.dataclass
class RunContext:
    """What every row of one benchmark run shares.

    Attributes:
        calibration: the calibration windows and the whole calibration token stream.
        recipe: the recipe of the ``edkm-*`` rows (the starts of the other palettization rows take its calibration
            settings) and of the ``fp-finetuned`` reference.
        tokenizer: the model's tokenizer (for teacher text).
    """

    calibration: CalibrationData
    recipe: Recipe = DEFAULT_RECIPE
    tokenizer: object = None

    def data(self) -> CompressionData:
        return CompressionData(train_ids=self.calibration.token_ids, tokenizer=self.tokenizer)


MethodFn = Callable[[torch.nn.Module, int, Optional[int], RunContext], QuantizationReport]


def _baseline(name: str) -> MethodFn:
    def compress(model, bits, group_size, context):
        from optimum_edkm import baselines

        started = time.perf_counter()
        if name == "rtn":
            result = baselines.rtn(model, bits, group_size)
        else:
            result = getattr(baselines, name)(model, context.calibration.input_ids, bits, group_size)
        return QuantizationReport(
            name, bits, group_size, result.storage, time.perf_counter() - started, result.settings, result.details
        )

    return compress


#: LUT layouts of the palettization rows: (name, output rows per LUT or None for one per tensor, per-channel scale)
LAYOUTS = (("tensor", None, False), ("scaled", None, True), ("g16", 16, True), ("channel", 1, False))
#: what each palettization method changes in the run's recipe (``edkm``: nothing)
RECIPE_CHANGES = {
    "kmeans": dict(start="kmeans", block_epochs=0, steps=0),
    "skm": dict(start="fisher", block_epochs=0, steps=0),
    "ptq": dict(start="post_training", block_epochs=0, steps=0),
    "edkm": {},
}


def _palettization(method: str, lut_group_size: Optional[int], channel_scale: bool) -> MethodFn:
    """A row compressed by :func:`optimum_edkm.compress` with this LUT layout and the run's recipe changed by
    :data:`RECIPE_CHANGES`."""

    def compress(model, bits, group_size, context):
        from optimum_edkm import EDKMConfig, compress
        from optimum_edkm.nn import palettized_storage

        layout = {} if lut_group_size is None else {"granularity": "per_grouped_channel", "group_size": lut_group_size}
        config = EDKMConfig(bits=bits, enable_per_channel_scale=channel_scale, **layout)
        recipe = dataclasses.replace(context.recipe, **RECIPE_CHANGES[method])
        report = compress(model, config, recipe, context.data(), progress=False)
        settings = dict(recipe.as_dict(), lut_group_size=lut_group_size, per_channel_scale=channel_scale)
        details = {"stages": report.stages}
        return QuantizationReport(
            method, bits, lut_group_size, palettized_storage(model), report.seconds, settings, details
        )

    return compress


def _finetuned_float(model, bits, group_size, context):
    """Reference row: cross-entropy fine-tuning of the float model on the calibration text (the recipe's steps,
    batch, length and learning rate), no clustering: it separates adaptation to the calibration text's kind
    from the cost of clustering."""
    from transformers import Trainer, TrainingArguments

    from optimum_edkm.api import quant_method
    from optimum_edkm.finetune import recipe_arguments, window_dataset

    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        # transformers de-quantizes a GGUF checkpoint to float on load but leaves it marked quantized, which
        # Trainer refuses to fine-tune; any other quantizer means the weights really are not float
        if quant_method(quantizer) != "gguf":
            raise ValueError("the float fine-tuning reference needs a float model, got a quantized one")
        model.hf_quantizer, model.is_quantized = None, False
    recipe = context.recipe
    steps = max(recipe.steps, 1)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        args = TrainingArguments(
            **recipe_arguments(
                workdir,
                steps,
                recipe.batch_size,
                recipe.learning_rate,
                logging_steps=max(1, steps // 10),
                progress=False,
            )
        )
        trainer = Trainer(
            model=model, args=args, train_dataset=window_dataset(context.calibration.token_ids, recipe.seq_len)
        )
        trainer.train()
    model.eval()
    settings = {
        "steps": steps,
        "learning_rate": recipe.learning_rate,
        "batch_size": recipe.batch_size,
        "seq_len": recipe.seq_len,
    }
    losses = [round(h["loss"], 4) for h in trainer.state.log_history if "loss" in h]
    return QuantizationReport(
        "fp-finetuned", None, None, {}, time.perf_counter() - started, settings, {"train_loss": losses}
    )


_finetuned_float.bits_independent = True

#: name -> method; runs in this order. ``group_size`` is the input-column group of the uniform methods (RTN,
#: GPTQ, AWQ); the palettization rows have their own LUT layout (module docstring).
METHODS: dict = {
    "rtn": _baseline("rtn"),
    "gptq": _baseline("gptq"),
    "awq": _baseline("awq"),
    **{
        f"{method}-{layout}": _palettization(method, rows, scale)
        for method in RECIPE_CHANGES
        for layout, rows, scale in LAYOUTS
    },
    "fp-finetuned": _finetuned_float,
}

#: what runs without --methods: the baselines, the post-training start and the main job's recipe at its layout
DEFAULT_METHODS = ["gptq", "awq", "ptq-channel", "edkm-channel"]


def register_method(name: str, method: MethodFn) -> None:
    """Add (or replace) a row: ``method(model, bits, group_size, context)`` compresses ``model`` in place and
    returns a :class:`QuantizationReport` whose ``storage`` describes it. A reference that does not depend on the
    bit width sets ``method.bits_independent = True`` and runs once."""
    if not isinstance(name, str) or not name or name == "fp":
        raise ValueError(f"method name must be a non-empty string other than 'fp', got {name!r}")
    if not callable(method):
        raise TypeError(f"method {name!r} must be callable(model, bits, group_size, context), got {method!r}")
    METHODS[name] = method
