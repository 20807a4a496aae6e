"""The main job as one call: ``compress(model, config, recipe, data) -> CompressionReport``.

What the command line (``optimum-edkm compress``), the example (``examples/compress.py``) and every row of
the quality benchmark run, in this order:

1. measure the float model on the evaluation texts;
2. keep a frozen copy of it as the teacher, and sample text from it (its own distribution, cached on disk) when
   the recipe mixes such text into calibration and training;
3. **start**: post-training palettization (GPTQ onto LUTs, :mod:`optimum_edkm.ptq`), Fisher-weighted k-means
   (:mod:`optimum_edkm.sensitivity`) or plain k-means, on calibration windows of the training text and the
   teacher's text; measure it;
4. **block-wise reconstruction** (:mod:`optimum_edkm.reconstruction`): each decoder layer trained to reproduce
   the float layer's outputs;
5. **end-to-end distillation** (:func:`optimum_edkm.finetune.finetune`): eDKM fine-tuning (or LUT tuning with
   frozen assignments) with the KL divergence to the float model's next-token distributions;
6. palettize and measure the result.

:class:`EDKMConfig` says what is stored (the format); :class:`Recipe` says how it is found (the method), as
torchao's configs and coremltools' optimizers separate them. Saving is the caller's
(:func:`optimum_edkm.save_pretrained`).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import tempfile
import time
from typing import Optional

import torch

from .config import EDKMConfig

logger = logging.getLogger(__name__)

#: where eDKM starts (:attr:`Recipe.start`), and how the report calls the model there
START_LABELS = {"post_training": "post-training start", "fisher": "Fisher k-means start", "kmeans": "k-means start"}
STARTS = tuple(START_LABELS)


def _check_number(name: str, value, low: float = 0.0, integer: bool = False, high: float = math.inf) -> None:
    kind = int if integer else (int, float)
    if not isinstance(value, kind) or isinstance(value, bool) or not low <= value <= high:
        shape = "an integer" if integer else "a number"
        bounds = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
        raise ValueError(f"Recipe.{name} must be {shape} {bounds}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How :func:`compress` finds the palettization (chosen on validation text only: docs/quality.md).

    Calibration and start:
        start: ``"post_training"`` (GPTQ onto LUTs with Hessian-weighted k-means, then a least-squares LUT refit),
            ``"fisher"`` (k-means weighted by the float model's Fisher diagonal) or ``"kmeans"``.
        calibration_samples, calibration_seq_len: calibration windows (Hessians, Fisher diagonal, block-wise
            reconstruction), ``calibration_samples`` of ``calibration_seq_len`` tokens.
        teacher_share: the share of calibration windows and training rows that are text sampled from the float
            model itself (its own distribution, which no user text covers); the rest are windows of the training
            text.
        refits: least-squares LUT refits of the post-training start.
    Block-wise reconstruction (:mod:`optimum_edkm.reconstruction`):
        block_epochs (0: none), block_learning_rate, block_train (``"edkm"`` / ``"lut"``).
    End-to-end distillation (:func:`optimum_edkm.finetune.finetune`):
        steps (0: none), batch_size, seq_len, learning_rate, warmup_steps, e2e_train (``"edkm"``: the float weights
        through eDKM's soft clustering; ``"lut"``: only the LUT entries, assignments frozen),
        distillation_weight (``1``: KL to the float model only, ``0``: cross-entropy only), distillation_loss,
        distillation_temperature.
    seed: windows, teacher text and training order.
    """

    start: str = "post_training"
    calibration_samples: int = 32
    calibration_seq_len: int = 512
    teacher_share: float = 0.5
    refits: int = 1
    block_epochs: int = 0
    block_learning_rate: float = 1e-5
    block_train: str = "edkm"
    steps: int = 0
    batch_size: int = 8
    seq_len: int = 256
    learning_rate: float = 1e-5
    warmup_steps: int = 0
    e2e_train: str = "edkm"
    distillation_weight: float = 1.0
    distillation_loss: str = "forward_kl"
    distillation_temperature: float = 1.0
    seed: int = 0

    def __post_init__(self):
        from .losses import DIVERGENCES
        from .reconstruction import TRAINED

        if self.start not in STARTS:
            raise ValueError(f"Recipe.start must be one of {STARTS}, got {self.start!r}")
        for name in ("block_train", "e2e_train"):
            if getattr(self, name) not in TRAINED:
                raise ValueError(f"Recipe.{name} must be one of {TRAINED}, got {getattr(self, name)!r}")
        if self.distillation_loss not in DIVERGENCES:
            raise ValueError(f"Recipe.distillation_loss must be one of {DIVERGENCES}, got {self.distillation_loss!r}")
        for name in ("calibration_samples", "calibration_seq_len", "batch_size", "seq_len"):
            _check_number(name, getattr(self, name), 1, integer=True)
        for name in ("refits", "block_epochs", "steps", "warmup_steps", "seed"):
            _check_number(name, getattr(self, name), 0, integer=True)
        _check_number("teacher_share", self.teacher_share, 0, high=1)
        _check_number("distillation_weight", self.distillation_weight, 0, high=1)
        for name in ("block_learning_rate", "learning_rate"):
            _check_number(name, getattr(self, name))
        if not self.distillation_temperature > 0:
            raise ValueError(f"Recipe.distillation_temperature must be > 0, got {self.distillation_temperature!r}")

    def as_dict(self) -> dict:
        record = dataclasses.asdict(self)
        record["tokens_seen"] = self.steps * self.batch_size * self.seq_len
        return record

    @property
    def needs_teacher(self) -> bool:
        """A frozen copy of the float model is kept (block-wise targets, distillation)."""
        return self.block_epochs > 0 or (self.steps > 0 and self.distillation_weight > 0)

    @property
    def teacher_samples(self) -> int:
        """Sequences of teacher text the recipe samples from the float model."""
        rows = round(self.teacher_share * self.calibration_samples)
        if self.steps:
            per_row = self.calibration_seq_len // self.seq_len
            rows = max(rows, math.ceil(self.teacher_share * self.steps * self.batch_size / max(per_row, 1)))
        return rows if self.teacher_share > 0 else 0


@dataclasses.dataclass
class CompressionData:
    """The text :func:`compress` works on (token ids of the model's tokenizer).

    Attributes:
        train_ids: 1-D token stream of real text: calibration windows, Fisher diagonal, training rows.
        tokenizer: the model's tokenizer (teacher text starts from its non-special tokens).
        evaluation: ``{label: 1-D token stream}`` scored after each stage (empty: nothing is measured).
        context_length: tokens per perplexity window.
        texts: ``{role: description}`` of the texts, copied into the report.
        cache_dir: where teacher text is cached (default ``$OPTIMUM_EDKM_CACHE/teacher-text``).
        float_perplexity: the float model's perplexity on the evaluation texts when already known (``{label:
            perplexity}``, e.g. cached by a sweep): not measured again.
    """

    train_ids: torch.Tensor
    tokenizer: object
    evaluation: dict = dataclasses.field(default_factory=dict)
    context_length: int = 512
    texts: dict = dataclasses.field(default_factory=dict)
    cache_dir: Optional[str] = None
    float_perplexity: Optional[dict] = None


@dataclasses.dataclass
class Row:
    """One measured model of the report: its label and perplexity per evaluation text."""

    label: str
    perplexity: dict = dataclasses.field(default_factory=dict)
    scored_tokens: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class CompressionReport:
    """What :func:`compress` did: the measured rows (float model, start, result), each stage's seconds and
    details, the size of the result (:func:`optimum_edkm.size_report`), the configuration, recipe and texts."""

    rows: list
    stages: dict
    size: dict
    config: dict
    recipe: dict
    texts: dict
    seconds: float

    def ratios(self, row: int = -1) -> dict:
        """``{text: perplexity of rows[row] / perplexity of the float model}``."""
        base, other = self.rows[0].perplexity, self.rows[row].perplexity
        return {text: other[text] / base[text] for text in other if text in base}

    def table(self) -> str:
        """The rows as a markdown table (one perplexity column and one ratio column per text)."""
        texts = list(self.rows[0].perplexity) if self.rows else []
        header = "| model | " + " | ".join(f"{t} perplexity | x float" for t in texts) + " |"
        lines = [header, "|---|" + "---:|---:|" * len(texts)]
        for number, row in enumerate(self.rows):
            ratios = self.ratios(number)
            cells = [f"{row.perplexity[t]:.3f} | {ratios[t]:.3f}" if t in row.perplexity else " | " for t in texts]
            lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        record = dataclasses.asdict(self)
        record["table"] = self.table()
        return record


#: the main job's recipe (README command 1, ``optimum-edkm compress``), chosen on validation text
#: (benchmarks/results/validation.jsonl, docs/quality.md round 3): the post-training start, then two epochs of
#: block-wise reconstruction of the LUTs with frozen assignments at lr 1e-3, the best out-of-domain row (V7;
#: eDKM in the loop at the same learning rate tied with it, V10, at 13% more time); the whole job takes ~10 of
#: the 15 minutes the 2-core machine allows
DEFAULT_RECIPE = Recipe(block_epochs=2, block_learning_rate=1e-3, block_train="lut")


def recipe_with(changes: dict, base: Optional[Recipe] = None) -> Recipe:
    """``base`` (default :data:`DEFAULT_RECIPE`) with the fields of ``changes`` that are not None replaced.
    ``steps=0`` without ``block_epochs`` means no training at all, block-wise included: the post-training start
    alone (``optimum-edkm compress --steps 0``)."""
    base = DEFAULT_RECIPE if base is None else base
    changes = {name: value for name, value in changes.items() if value is not None}
    if changes.get("steps") == 0 and "block_epochs" not in changes:
        changes["block_epochs"] = 0
    return dataclasses.replace(base, **changes)


#: the main job's LUT layout (keyword arguments of :class:`~optimum_edkm.EDKMConfig`): one 8-entry LUT per output
#: channel and no scale (3.19 bits per weight at 3 bits and 576 input columns), the layout that did best on
#: validation text for every method (docs/quality.md, round 2)
DEFAULT_LAYOUT = {"granularity": "per_grouped_channel", "group_size": 1, "enable_per_channel_scale": False}


def check_data(model, data: CompressionData, recipe: Recipe) -> None:
    """Refuse, before any work, text too short for the recipe and token ids the model cannot embed."""
    from .evaluation.perplexity import check_token_ids

    ids = data.train_ids
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.is_floating_point():
        raise ValueError(f"train_ids must be a 1-D integer token stream, got {getattr(ids, 'shape', type(ids))}")
    longest = max(recipe.calibration_seq_len, recipe.seq_len if recipe.steps else 0)
    if ids.numel() < longest:
        raise ValueError(
            f"the training text has {ids.numel()} tokens, fewer than one window of {longest}; give more text or "
            f"shorter windows (Recipe.calibration_seq_len / seq_len)"
        )
    check_token_ids(ids, model)
    for label, stream in data.evaluation.items():
        if not isinstance(stream, torch.Tensor) or stream.dim() != 1 or stream.numel() < 2:
            raise ValueError(f"evaluation text {label!r} must be a 1-D token stream of at least 2 tokens")
        check_token_ids(stream, model)


def calibration_rows(data: CompressionData, teacher_text: Optional[torch.Tensor], recipe: Recipe) -> torch.Tensor:
    """``[calibration_samples, calibration_seq_len]``: windows of the training text and, for
    ``teacher_share``, rows of teacher text, in a seeded order."""
    from .data import sample_windows

    samples, length = recipe.calibration_samples, recipe.calibration_seq_len
    from_teacher = 0 if teacher_text is None else min(round(recipe.teacher_share * samples), teacher_text.shape[0])
    parts = []
    if from_teacher:
        parts.append(teacher_text[:from_teacher, :length])
    if samples - from_teacher:
        parts.append(sample_windows(data.train_ids, samples - from_teacher, length, recipe.seed))
    rows = torch.cat(parts)
    return rows[torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(recipe.seed))]


def calibration_set(model, data: CompressionData, recipe: Recipe, progress: bool = False) -> torch.Tensor:
    """The calibration windows the recipe's start calibrates on (sampling the teacher text from the float
    ``model`` first, cached): what a benchmark gives the baselines so that every method sees the same data."""
    return calibration_rows(data, _teacher_text(model, data, recipe, progress), recipe)


def _teacher_text(model, data: CompressionData, recipe: Recipe, progress: bool) -> Optional[torch.Tensor]:
    """``[n, calibration_seq_len]`` text sampled from the float model (cached), or ``None``."""
    if not recipe.teacher_samples:
        return None
    from .distillation import GenerationSettings, cached_teacher_data

    batch = GenerationSettings.batch_size
    whole_batches = math.ceil(recipe.teacher_samples / batch) * batch  # what the cache serves from a longer file
    settings = GenerationSettings(sequences=whole_batches, seq_len=recipe.calibration_seq_len, seed=recipe.seed)
    text = cached_teacher_data(model, data.tokenizer, settings, cache_dir=data.cache_dir, progress=progress)
    return text[: recipe.teacher_samples]


def _measure(model, data: CompressionData, label: str, progress: bool) -> Row:
    from .evaluation import evaluate_perplexity

    row = Row(label)
    for text, ids in data.evaluation.items():
        result = evaluate_perplexity(
            model, ids, context_length=data.context_length, progress=progress, description=label
        )
        row.perplexity[text], row.scored_tokens[text] = result.perplexity, result.scored_tokens
        logger.info("%s: %s perplexity %.3f (%d tokens)", label, text, result.perplexity, result.scored_tokens)
    return row


def _start(model, config: EDKMConfig, recipe: Recipe, data: CompressionData, rows: torch.Tensor, progress: bool):
    """Prepare the float ``model`` for eDKM at the recipe's start; returns the stage details."""
    from .api import prepare

    if recipe.start == "post_training":
        from .ptq import palettize_post_training

        result = palettize_post_training(
            model, rows, config, refits=recipe.refits, act_order=True, batch_size=4, progress=progress
        )
        return {"settings": result.settings}
    if recipe.start == "fisher":
        from .sensitivity import fisher_diagonal

        fisher = fisher_diagonal(
            model,
            data.train_ids,
            samples=recipe.calibration_samples,
            seq_len=recipe.calibration_seq_len,
            seed=recipe.seed,
        )
        prepare(model, config, importance=fisher)
        return {"fisher_samples": recipe.calibration_samples}
    prepare(model, config)
    return {}


def _training_rows(data: CompressionData, teacher_text: Optional[torch.Tensor], recipe: Recipe) -> tuple:
    """(token stream, sequences) the end-to-end stage trains on: the training text's windows and teacher text cut
    to ``seq_len`` rows, in the recipe's share."""
    if teacher_text is None:
        return data.train_ids, None
    per_row = recipe.calibration_seq_len // recipe.seq_len
    sequences = teacher_text[:, : per_row * recipe.seq_len].reshape(-1, recipe.seq_len)
    if recipe.teacher_share >= 1:
        return None, sequences
    available = data.train_ids.numel() // recipe.seq_len
    wanted = round(sequences.shape[0] * (1 - recipe.teacher_share) / recipe.teacher_share)
    return data.train_ids[: min(available, max(wanted, 1)) * recipe.seq_len], sequences


def compress(
    model,
    config: EDKMConfig,
    recipe: Recipe = DEFAULT_RECIPE,
    data: Optional[CompressionData] = None,
    palettes: Optional[dict] = None,
    progress: bool = True,
) -> CompressionReport:
    """Compress the float ``model`` in place with ``config`` (the format) and ``recipe`` (the method); returns the
    :class:`CompressionReport`. The model ends palettized (LUTs + packed indices), ready for
    :func:`optimum_edkm.save_pretrained`. See the module docstring for the stages.

    ``palettes`` (``{module name: Palette}``, e.g. :func:`optimum_edkm.palettes_of` of a saved post-training
    model) replaces the recipe's start: the training stages continue from that palettization."""
    from .api import palettize, quant_method, size_report
    from .finetune import finetune

    if not isinstance(config, EDKMConfig):
        raise TypeError(f"config must be an EDKMConfig, got {type(config).__name__}")
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be an optimum_edkm.Recipe, got {type(recipe).__name__}")
    if data is None:
        raise ValueError("compress needs data=CompressionData(train_ids=..., tokenizer=...)")
    if quant_method(model) not in (None, "gguf"):
        raise ValueError(f"compress takes a float model; this one is quantized ({quant_method(model)})")
    check_data(model, data, recipe)
    started = time.perf_counter()
    stages, rows = {}, []

    def stage(name: str, tic: float, **details) -> None:
        stages[name] = {"seconds": time.perf_counter() - tic, **details}
        logger.info("compress: %s done in %.0f s", name, stages[name]["seconds"])

    tic = time.perf_counter()
    if data.evaluation and data.float_perplexity:
        rows.append(Row("float model", {text: data.float_perplexity[text] for text in data.evaluation}))
    elif data.evaluation:
        rows.append(_measure(model, data, "float model", progress))
    teacher = copy.deepcopy(model).eval().requires_grad_(False) if recipe.needs_teacher else None
    teacher_text = _teacher_text(model, data, recipe, progress)
    stage("float model and teacher text", tic, teacher_sequences=0 if teacher_text is None else len(teacher_text))

    tic = time.perf_counter()
    calibration = calibration_rows(data, teacher_text, recipe)
    if palettes is not None:
        from .api import prepare

        prepare(model, config, palettes=palettes)
        stage("start", tic, kind="given palettes")
        start_label = "given start"
    else:
        details = _start(model, config, recipe, data, calibration, progress)
        stage("start", tic, kind=recipe.start, **details)
        start_label = START_LABELS[recipe.start]
    if data.evaluation and (recipe.block_epochs or recipe.steps):
        rows.append(_measure(model, data, f"{start_label}, {config.bits}-bit", progress))

    if recipe.block_epochs:
        from .reconstruction import ReconstructionOptions, reconstruct_blocks

        tic = time.perf_counter()
        options = ReconstructionOptions(
            epochs=recipe.block_epochs, learning_rate=recipe.block_learning_rate, train=recipe.block_train
        )
        history = reconstruct_blocks(model, teacher, calibration, options, seed=recipe.seed, progress=progress)
        stage(
            "block-wise reconstruction",
            tic,
            error=[(h["error_before"], h["error_after"]) for h in history],
            layers_kept_as_they_were=[h["layer"] for h in history if not h["trained_kept"]],
            options=dataclasses.asdict(options),
        )

    if recipe.steps:
        tic = time.perf_counter()
        token_ids, sequences = _training_rows(data, teacher_text, recipe)
        with tempfile.TemporaryDirectory(prefix="edkm-trainer-") as scratch:  # Trainer wants a folder; saves nothing
            trainer = finetune(
                model,
                token_ids,
                output_dir=scratch,
                steps=recipe.steps,
                seq_len=recipe.seq_len,
                batch_size=recipe.batch_size,
                learning_rate=recipe.learning_rate,
                warmup_steps=recipe.warmup_steps,
                seed=recipe.seed,
                progress=progress,
                teacher_model=teacher if recipe.distillation_weight > 0 else None,
                sequences=sequences,
                train=recipe.e2e_train,
                distillation_weight=recipe.distillation_weight,
                distillation_loss=recipe.distillation_loss,
                distillation_temperature=recipe.distillation_temperature,
            )
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        stage("end-to-end distillation", tic, steps=trainer.state.global_step, train_loss=losses)
        del trainer
    del teacher

    tic = time.perf_counter()
    if not model.config.quantization_config.palettized:
        palettize(model)
    if data.evaluation:
        trained = recipe.block_epochs or recipe.steps
        label = f"{'trained' if trained else start_label}, {config.bits}-bit"
        rows.append(_measure(model, data, label, progress))
    stage("palettize and measure", tic)
    return CompressionReport(
        rows=rows,
        stages=stages,
        size=size_report(model),
        config=model.config.quantization_config.to_dict(),
        recipe=recipe.as_dict(),
        texts=dict(data.texts),
        seconds=time.perf_counter() - started,
    )
