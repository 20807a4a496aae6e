"""The rows of the quality benchmark: how each method compresses a fresh copy of the model.

A method is ``callable(model, bits, group_size, context) -> QuantizationReport``; it compresses ``model`` in
place. ``context`` (:class:`RunContext`) holds the calibration data, the row options and what several rows
share and is computed once (the float model's Fisher diagonal, the teacher text). :func:`register_method`
adds a row.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
import time
from typing import Callable, Optional

import torch

from optimum_edkm.data import TextData, sample_windows
from optimum_edkm.finetune import DEFAULT_RECIPE, Recipe


@dataclasses.dataclass
class CalibrationData:
    """Tokenised calibration text, as every compression method in the benchmark receives it.

    Attributes:
        input_ids: ``[n_samples, seq_len]`` random windows of the calibration text (what GPTQ / AWQ use).
        token_ids: the whole calibration text as one token stream (for methods that fine-tune on more).
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
            :class:`~optimum_edkm.evaluation.WeightStorage`; feeds :func:`~optimum_edkm.evaluation.effective_bits`.
        seconds: wall-clock time of the compression.
        settings: the method's hyper-parameters.
        details: method-specific diagnostics (per-module errors, chosen scales, training losses, ...).
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
        recipe: the fine-tuning recipe of the ``edkm-*`` and ``fp-finetuned`` rows.
        fisher_samples: calibration windows of ``recipe.seq_len`` tokens for the Fisher diagonal.
        tokenizer: the model's tokenizer (for teacher text).
    """

    calibration: CalibrationData
    recipe: Recipe = DEFAULT_RECIPE
    fisher_samples: int = 32
    tokenizer: object = None
    _fisher: Optional[dict] = None
    _teacher_text: Optional[torch.Tensor] = None

    def fisher(self, base) -> dict:
        """The float model's Fisher diagonal on the calibration text (computed once per run)."""
        if self._fisher is None:
            from optimum_edkm.sensitivity import fisher_diagonal

            self._fisher = fisher_diagonal(
                base, self.calibration.token_ids, samples=self.fisher_samples, seq_len=self.recipe.seq_len
            )
        return self._fisher

    def teacher_text(self, base) -> Optional[torch.Tensor]:
        """The recipe's teacher text (generated once per run, cached on disk), or ``None``."""
        if self.recipe.teacher_sequences and self._teacher_text is None:
            self._teacher_text = self.recipe.teacher_text(base, self.tokenizer)
        return self._teacher_text


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


def _train_losses(trainer) -> list:
    return [round(h["loss"], 4) for h in trainer.state.log_history if "loss" in h]


def _palettization(
    lut_group_size: Optional[int],
    fine_tune: bool,
    channel_scale: bool = True,
    sensitivity: bool = False,
    cross_entropy: bool = False,
) -> MethodFn:
    """A row compressed by optimum-edkm: k-means palettization (``fine_tune=False``) or eDKM fine-tuning, with one
    LUT per tensor (``lut_group_size=None``) or per ``lut_group_size`` output rows, with a per-output-channel scale
    (``channel_scale``), k-means weighted by the float model's Fisher diagonal (``sensitivity``), and either the
    recipe as it is (distillation by default) or the former cross-entropy recipe (``cross_entropy``)."""

    def compress(model, bits, group_size, context):
        from optimum_edkm.api import palettize, prepare
        from optimum_edkm.config import EDKMConfig
        from optimum_edkm.finetune import finetune
        from optimum_edkm.nn import palettized_storage

        recipe = context.recipe
        if cross_entropy:
            recipe = dataclasses.replace(recipe, distillation_weight=0.0, teacher_sequences=0)
        granularity = (
            {} if lut_group_size is None else {"granularity": "per_grouped_channel", "group_size": lut_group_size}
        )
        config = EDKMConfig(
            bits=bits, temperature=recipe.temperature, enable_per_channel_scale=channel_scale, **granularity
        )
        started = time.perf_counter()
        settings = {
            "lut_group_size": lut_group_size,
            "per_channel_scale": channel_scale,
            "sensitivity_weighted": sensitivity,
            "temperature": recipe.temperature,
        }
        details = {}
        weighted = sensitivity or (fine_tune and recipe.fisher_samples > 0)
        settings["sensitivity_weighted"] = weighted
        fine_tuned_with_teacher = fine_tune and recipe.distillation_weight > 0
        teacher = copy.deepcopy(model) if fine_tuned_with_teacher else None
        generated = context.teacher_text(model) if fine_tune and recipe.teacher_sequences else None
        if weighted:
            settings["fisher_samples"] = context.fisher_samples
            prepare(model, config, importance=context.fisher(model))
        else:
            prepare(model, config)
        if fine_tune:
            with tempfile.TemporaryDirectory() as workdir:
                trainer = finetune(
                    model,
                    context.calibration.token_ids if recipe.use_text else None,
                    output_dir=workdir,
                    progress=False,
                    teacher_model=teacher,
                    sequences=generated,
                    logging_steps=max(1, recipe.steps // 10),
                    **recipe.finetune_arguments(),
                )
            del teacher
            settings.update(recipe.as_dict())
            details["train_loss"] = _train_losses(trainer)
        else:
            palettize(model)
        method = "edkm" if fine_tune else "skm" if weighted else "kmeans"
        return QuantizationReport(
            method, bits, lut_group_size, palettized_storage(model), time.perf_counter() - started, settings, details
        )

    return compress


def _finetuned_float(model, bits, group_size, context):
    """Reference row: the former recipe's cross-entropy fine-tuning (same text, steps, batch, learning rate and
    schedule as the ``edkm-ce-*`` rows) on the float model, no clustering: it separates adaptation to the
    calibration text's kind from the cost of clustering."""
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
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        args = TrainingArguments(
            **recipe_arguments(
                workdir,
                recipe.steps,
                recipe.batch_size,
                recipe.learning_rate,
                logging_steps=max(1, recipe.steps // 10),
                progress=False,
            )
        )
        trainer = Trainer(
            model=model, args=args, train_dataset=window_dataset(context.calibration.token_ids, recipe.seq_len)
        )
        trainer.train()
    model.eval()
    settings = {k: v for k, v in recipe.as_dict().items() if k in ("steps", "learning_rate", "batch_size", "seq_len")}
    return QuantizationReport(
        "fp-finetuned", None, None, {}, time.perf_counter() - started, settings, {"train_loss": _train_losses(trainer)}
    )


_finetuned_float.bits_independent = True

#: name -> method; runs in this order. ``group_size`` is the input-column group of the uniform methods; the
#: palettization rows have their own LUT granularity: ``-tensor`` one fp16 LUT per weight tensor; ``-scaled`` the
#: same with an fp16 scale per output channel; ``-g16`` one LUT per 16 output rows plus the scale; ``-channel``
#: one LUT per output channel. ``skm-*``: k-means weighted by the float model's Fisher diagonal. ``edkm-*``
#: fine-tune with the default recipe (distillation from the float model), ``edkm-ce-*`` with the former one
#: (cross-entropy on the calibration text).
METHODS: dict = {
    "rtn": _baseline("rtn"),
    "gptq": _baseline("gptq"),
    "awq": _baseline("awq"),
    "kmeans-tensor": _palettization(None, fine_tune=False, channel_scale=False),
    "kmeans-scaled": _palettization(None, fine_tune=False),
    "kmeans-g16": _palettization(16, fine_tune=False),
    "kmeans-channel": _palettization(1, fine_tune=False, channel_scale=False),
    "skm-scaled": _palettization(None, fine_tune=False, sensitivity=True),
    "skm-g16": _palettization(16, fine_tune=False, sensitivity=True),
    "skm-channel": _palettization(1, fine_tune=False, channel_scale=False, sensitivity=True),
    "edkm-tensor": _palettization(None, fine_tune=True, channel_scale=False),
    "edkm-scaled": _palettization(None, fine_tune=True),
    "edkm-g16": _palettization(16, fine_tune=True),
    "edkm-channel": _palettization(1, fine_tune=True, channel_scale=False),
    "edkm-skm-scaled": _palettization(None, fine_tune=True, sensitivity=True),
    "edkm-skm-g16": _palettization(16, fine_tune=True, sensitivity=True),
    "edkm-skm-channel": _palettization(1, fine_tune=True, channel_scale=False, sensitivity=True),
    "edkm-ce-scaled": _palettization(None, fine_tune=True, cross_entropy=True),
    "fp-finetuned": _finetuned_float,
}

#: what runs without --methods
DEFAULT_METHODS = [
    "fp-finetuned",
    "rtn",
    "gptq",
    "awq",
    "kmeans-scaled",
    "kmeans-g16",
    "skm-scaled",
    "skm-g16",
    "edkm-ce-scaled",
    "edkm-scaled",
    "edkm-skm-g16",
]


def register_method(name: str, method: MethodFn) -> None:
    """Add (or replace) a row: ``method(model, bits, group_size, context)`` compresses ``model`` in place and
    returns a :class:`QuantizationReport` whose ``storage`` describes it. A reference that does not depend on the
    bit width sets ``method.bits_independent = True`` and runs once."""
    if not isinstance(name, str) or not name or name == "fp":
        raise ValueError(f"method name must be a non-empty string other than 'fp', got {name!r}")
    if not callable(method):
        raise TypeError(f"method {name!r} must be callable(model, bits, group_size, context), got {method!r}")
    METHODS[name] = method
