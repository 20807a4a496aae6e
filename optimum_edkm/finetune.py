"""End-to-end clustering-aware fine-tuning: the last training stage of :func:`optimum_edkm.compress`.

A thin layer over :class:`~optimum_edkm.trainer.EDKMTrainer`: it turns a token stream (and rows of teacher text)
into fixed-length training windows (a ``datasets.Dataset``), prepares the model for eDKM if needed, trains for a
given number of optimizer steps - the float weights through eDKM's soft clustering, or only the LUT entries with
frozen assignments (:func:`optimum_edkm.reconstruction.frozen_assignments`) - and palettizes the result.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from datasets import Dataset

from .api import prepare
from .config import EDKMConfig
from .evaluation.perplexity import check_token_ids
from .nn import is_clustered
from .reconstruction import TRAINED, frozen_assignments, norm_weights
from .trainer import EDKMTrainer, EDKMTrainingArguments


def token_windows(token_ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Consecutive, non-overlapping ``seq_len``-token windows of a 1-D token stream, ``[count, seq_len]``."""
    if token_ids.dim() != 1:
        raise ValueError(f"token_ids must be a 1-D token stream, got shape {tuple(token_ids.shape)}")
    count = token_ids.numel() // seq_len
    if count < 1:
        raise ValueError(f"the text has {token_ids.numel()} tokens, fewer than one window of seq_len={seq_len}")
    return token_ids[: count * seq_len].view(count, seq_len)


def sequence_dataset(sequences: torch.Tensor) -> Dataset:
    """A ``datasets.Dataset`` of ``[count, seq_len]`` token rows (labels = inputs)."""
    if sequences.dim() != 2:
        raise ValueError(f"sequences must be [count, seq_len], got shape {tuple(sequences.shape)}")
    rows = sequences.tolist()
    return Dataset.from_dict({"input_ids": rows, "labels": rows})


def window_dataset(token_ids: torch.Tensor, seq_len: int) -> Dataset:
    """Consecutive, non-overlapping ``seq_len``-token windows of a 1-D token stream (labels = inputs)."""
    return sequence_dataset(token_windows(token_ids, seq_len))


def training_rows(
    token_ids: Optional[torch.Tensor], seq_len: int, sequences: Optional[torch.Tensor] = None, seed: int = 0
) -> torch.Tensor:
    """The windows of ``token_ids`` and the rows of ``sequences`` together, shuffled with ``seed`` when both are
    given (Trainer shuffles every epoch again)."""
    from .distillation import mix_sequences

    parts = []
    if token_ids is not None:
        parts.append(token_windows(token_ids, seq_len))
    if sequences is not None:
        if sequences.dim() != 2 or sequences.shape[1] != seq_len:
            raise ValueError(f"sequences must be [count, seq_len={seq_len}], got shape {tuple(sequences.shape)}")
        parts.append(sequences.long().cpu())
    if not parts:
        raise ValueError("nothing to train on: pass token_ids (a token stream), sequences ([count, seq_len]) or both")
    return parts[0] if len(parts) == 1 else mix_sequences(parts, seed)


def recipe_arguments(
    output_dir: str,
    steps: int,
    batch_size: int,
    learning_rate: float,
    warmup_steps: int = 0,
    seed: int = 0,
    logging_steps: int = 5,
    progress: bool = True,
) -> dict:
    """The ``TrainingArguments`` fields of the recipe, shared with the float fine-tuning reference of the quality
    benchmark so that both train the same way."""
    return dict(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        warmup_steps=warmup_steps,
        lr_scheduler_type="cosine",
        weight_decay=0.0,
        logging_steps=logging_steps,
        save_strategy="no",
        report_to=[],
        seed=seed,
        disable_tqdm=not progress,
        use_cpu=not torch.cuda.is_available(),
        dataloader_drop_last=True,
    )


def finetune(
    model,
    token_ids: Optional[torch.Tensor],
    config: Optional[EDKMConfig] = None,
    *,
    output_dir: str,
    steps: int = 30,
    seq_len: int = 256,
    batch_size: int = 8,
    learning_rate: float = 1e-5,
    warmup_steps: int = 0,
    seed: int = 0,
    logging_steps: int = 5,
    progress: bool = True,
    teacher_model=None,
    sequences: Optional[torch.Tensor] = None,
    train: str = "edkm",
    train_norms: bool = True,
    **training_arguments,
) -> EDKMTrainer:
    """Fine-tune ``model`` with eDKM for ``steps`` optimizer steps and palettize it.

    The training rows are the ``seq_len``-token windows of the stream ``token_ids`` plus the rows of
    ``sequences`` (``[count, seq_len]``, e.g. teacher text from :func:`optimum_edkm.distillation.cached_teacher_data`);
    either may be ``None``. ``model`` is either already prepared (loaded with ``quantization_config=EDKMConfig(...)``)
    or a float model, which is prepared with ``config`` first. ``train``: ``"edkm"`` trains the clustered float
    weights through eDKM's soft clustering, ``"lut"`` only the LUT entries (every weight keeps its entry); with
    ``train_norms`` the normalisation weights train too; nothing else does (embeddings, heads and other float
    parameters stay as they are). Extra keyword arguments go to :class:`EDKMTrainingArguments`.
    ``teacher_model`` (e.g. a copy of the float model taken before preparing it) enables distillation with
    ``distillation_weight`` / ``distillation_loss``. Returns the trainer (``trainer.model`` is the palettized
    model, ``trainer.state.log_history`` the logs).
    """
    if train not in TRAINED:
        raise ValueError(f"train must be one of {TRAINED}, got {train!r}")
    for rows in (token_ids, sequences):  # before preparing: an id beyond the vocabulary fails in forward
        if isinstance(rows, torch.Tensor):
            check_token_ids(rows, model)
    if getattr(model, "hf_quantizer", None) is None:
        if config is None:
            raise ValueError("pass config=EDKMConfig(...) to fine-tune a float model")
        prepare(model, config)
    elif config is not None:
        raise ValueError("the model is already prepared for eDKM; its own config is used, do not pass config")
    dataset = sequence_dataset(training_rows(token_ids, seq_len, sequences, seed))
    args = EDKMTrainingArguments(
        **recipe_arguments(output_dir, steps, batch_size, learning_rate, warmup_steps, seed, logging_steps, progress),
        **training_arguments,
    )
    clustered = [module for module in model.modules() if is_clustered(module)]
    flags = {parameter: parameter.requires_grad for parameter in model.parameters()}
    context = frozen_assignments(clustered) if train == "lut" else contextlib.nullcontext(None)
    try:
        with context as luts:
            trained = list(luts.values()) if luts is not None else [module.weight for module in clustered]
            for parameter in model.parameters():
                parameter.requires_grad_(False)
            for parameter in trained + (norm_weights(model) if train_norms else []):
                parameter.requires_grad_(True)
            trainer = EDKMTrainer(model=model, args=args, train_dataset=dataset, teacher_model=teacher_model)
            trainer.train()
    finally:
        for parameter, flag in flags.items():
            parameter.requires_grad_(flag)
    trainer.finalize()
    return trainer
