"""``EDKMTrainer``: clustering-aware fine-tuning with the ``transformers.Trainer`` users already know.

Everything Trainer does (datasets, collators, logging, evaluation, callbacks, checkpoints, resuming,
DDP through ``torchrun`` / ``accelerate launch``) is unchanged. On top of it:

* a schedule: clustering starts after ``clustering_milestone`` steps (the centroids are then re-initialised
  by k-means from the fine-tuned weights), the softmax temperature can be annealed, and centroids that
  collapse onto a neighbour are spread again;
* cluster statistics in the logs;
* at the end of training the model is palettized (``palettize_at_end``) so that ``save_model`` writes the
  deployable checkpoint.

Everything the schedule depends on is a function of ``state.global_step`` (saved by Trainer) or lives in
the model's state dict (centroids, temperatures, scales), so ``resume_from_checkpoint`` continues exactly.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Optional

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from .api import _edkm_config, palettize
from .config import EDKMConfig
from .distillation import DIVERGENCES, distillation_term
from .modules import CLUSTERED_TYPES

TEMPERATURE_SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class EDKMTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the clustering schedule."""

    clustering_milestone: int = field(default=0, metadata={
        "help": "optimizer steps of plain fine-tuning before clustering starts (centroids are re-initialised "
                "from the weights at that step)"})
    temperature_schedule: str = field(default="constant", metadata={
        "help": "'constant', or anneal the temperature from its initial value to final_temperature_factor "
                "times it with a 'linear' or 'cosine' schedule after the milestone"})
    final_temperature_factor: float = field(default=0.1, metadata={"help": "end of the temperature schedule"})
    collapse_tolerance: float = field(default=1e-3, metadata={
        "help": "centroids closer than this fraction of the mean centroid spacing are treated as collapsed and "
                "spread again before the step; 0 disables the repair"})
    cluster_stats_sample: int = field(default=65536, metadata={
        "help": "weights per module sampled (fixed positions) for the logged cluster statistics"})
    palettize_at_end: bool = field(default=True, metadata={
        "help": "snap the model to its palettized form when train() finishes, so save_model writes it"})
    distillation_weight: float = field(default=0.0, metadata={
        "help": "weight of the distillation loss (KL divergence to the teacher's next-token distribution); the "
                "loss is (1 - w) * cross-entropy + w * KL. Needs EDKMTrainer(teacher_model=...)"})
    distillation_temperature: float = field(default=1.0, metadata={
        "help": "softmax temperature of the distillation loss (the KL term is multiplied by its square)"})
    distillation_loss: str = field(default="forward_kl", metadata={
        "help": f"divergence to the teacher, one of {DIVERGENCES} (optimum_edkm.distillation.token_divergence)"})

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.clustering_milestone, int) or self.clustering_milestone < 0:
            raise ValueError(f"clustering_milestone must be an integer >= 0, got {self.clustering_milestone!r}")
        if self.temperature_schedule not in TEMPERATURE_SCHEDULES:
            raise ValueError(f"temperature_schedule must be one of {TEMPERATURE_SCHEDULES}, got "
                             f"{self.temperature_schedule!r}")
        if not 0 < self.final_temperature_factor or not math.isfinite(self.final_temperature_factor):
            raise ValueError(f"final_temperature_factor must be a finite number > 0, got "
                             f"{self.final_temperature_factor!r}")
        if self.collapse_tolerance < 0:
            raise ValueError(f"collapse_tolerance must be >= 0, got {self.collapse_tolerance!r}")
        if self.cluster_stats_sample < 1:
            raise ValueError(f"cluster_stats_sample must be >= 1, got {self.cluster_stats_sample!r}")
        if not 0 <= self.distillation_weight <= 1:
            raise ValueError(f"distillation_weight must be in [0, 1], got {self.distillation_weight!r}")
        if not self.distillation_temperature > 0:
            raise ValueError(f"distillation_temperature must be > 0, got {self.distillation_temperature!r}")
        if self.distillation_loss not in DIVERGENCES:
            raise ValueError(f"distillation_loss must be one of {DIVERGENCES}, got {self.distillation_loss!r}")


def temperature_factor(args: EDKMTrainingArguments, step: int, max_steps: int) -> float:
    """Multiplier of every module's temperature at optimizer step ``step``."""
    if args.temperature_schedule == "constant" or max_steps <= args.clustering_milestone:
        return 1.0
    progress = min(max(step - args.clustering_milestone, 0) / (max_steps - args.clustering_milestone), 1.0)
    final = args.final_temperature_factor
    if args.temperature_schedule == "linear":
        return 1.0 + (final - 1.0) * progress
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


class _ClusteringSchedule(TrainerCallback):
    """Applies the schedule at the start of every optimizer step (and of training, for resumed runs)."""

    def __init__(self, trainer: "EDKMTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._apply_schedule(state.global_step, state.max_steps, starting=True)

    def on_step_begin(self, args, state, control, **kwargs):
        self.trainer._apply_schedule(state.global_step, state.max_steps, starting=False)


class EDKMTrainer(Trainer):
    """``transformers.Trainer`` for models loaded with ``quantization_config=EDKMConfig(...)``.

    Takes :class:`EDKMTrainingArguments` (plain ``TrainingArguments`` also work, with the defaults of the
    schedule). After ``train()`` the model is palettized unless ``palettize_at_end=False``.
    """

    def __init__(self, model=None, args: Optional[TrainingArguments] = None, *positional, teacher_model=None,
                 **kwargs):
        if args is None:
            raise ValueError("EDKMTrainer needs args=EDKMTrainingArguments(output_dir=...)")
        if _schedule(args).distillation_weight > 0 and teacher_model is None:
            raise ValueError("distillation_weight > 0 needs a teacher: EDKMTrainer(..., teacher_model=<the float "
                             "model>)")
        base = _base_model(model)
        config = _edkm_config(base)
        if config.palettized or not any(isinstance(m, CLUSTERED_TYPES) for m in base.modules()):
            raise ValueError("the model is already palettized (LUTs and indices only): there are no float weights "
                             "left to fine-tune; load the float or train-format checkpoint instead")
        super().__init__(model, args, *positional, **kwargs)
        self.edkm_config: EDKMConfig = config
        self.teacher_model = teacher_model
        if teacher_model is not None:
            teacher_model.eval().requires_grad_(False)
            teacher_model.to(self.args.device)
        self._sample_positions = {}
        self._last_labels = {}
        self._collapsed_since_log = 0
        self._milestone_initialised = False
        self.add_callback(_ClusteringSchedule(self))

    # ------------------------------------------------------------------------------------------ schedule
    def clustered_modules(self):
        return [(name, m) for name, m in _base_model(self.model).named_modules() if isinstance(m, CLUSTERED_TYPES)]

    @torch.no_grad()
    def _apply_schedule(self, step: int, max_steps: int, starting: bool) -> None:
        args = _schedule(self.args)
        active = step >= args.clustering_milestone
        factor = temperature_factor(args, step, max_steps)
        for name, module in self.clustered_modules():
            module.clustering_enabled = active
            module.temperature_factor = factor
        if active and args.clustering_milestone > 0 and step == args.clustering_milestone and \
                not self._milestone_initialised:
            # the weights moved during plain fine-tuning: start clustering from their current k-means
            for name, module in self.clustered_modules():
                module.init_clusters(seed=self.edkm_config.seed, name=f"{name}.weight")
            self._milestone_initialised = True
        if active and args.collapse_tolerance > 0 and not starting:
            for _, module in self.clustered_modules():
                self._collapsed_since_log += module.repair_collapsed_centroids(args.collapse_tolerance)

    # ------------------------------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Trainer's loss, mixed with the KL divergence to the teacher when ``distillation_weight > 0``."""
        weight = _schedule(self.args).distillation_weight
        if self.teacher_model is None or weight == 0 or not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        labels = inputs.get("labels")
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        temperature = _schedule(self.args).distillation_temperature
        with torch.no_grad():
            teacher_logits = self.teacher_model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        distillation = distillation_term(outputs.logits, teacher_logits, labels, _schedule(self.args).distillation_loss,
                                         temperature, num_items_in_batch)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            distillation = distillation * self.accelerator.num_processes
        loss = (1 - weight) * loss + weight * distillation
        return (loss, outputs) if return_outputs else loss

    # ------------------------------------------------------------------------------------------ logging
    @torch.no_grad()
    def cluster_statistics(self) -> dict:
        """Mean soft-assignment entropy (nats) and the fraction of sampled weights whose nearest centroid
        changed since the previous call, over all clustered modules (weighted by sample size)."""
        entropy_sum, samples, changed, compared = 0.0, 0, 0, 0
        for name, module in self.clustered_modules():
            if not module.clustering_enabled:
                continue
            numel = module.weight.numel()
            if name not in self._sample_positions:
                generator = torch.Generator().manual_seed(self.edkm_config.seed)
                count = min(numel, _schedule(self.args).cluster_stats_sample)
                positions = torch.randperm(numel, generator=generator)[:count] if count < numel \
                    else torch.arange(numel)
                self._sample_positions[name] = positions.to(module.weight.device)
            labels, entropy = module.assignment_sample(self._sample_positions[name])
            entropy_sum += float(entropy.sum())
            samples += entropy.numel()
            previous = self._last_labels.get(name)
            if previous is not None:
                changed += int((previous != labels).sum())
                compared += labels.numel()
            self._last_labels[name] = labels
        stats = {}
        if samples:
            stats["edkm/assignment_entropy"] = entropy_sum / samples
        if compared:
            stats["edkm/reassigned_fraction"] = changed / compared
        return stats

    def log(self, logs: dict, start_time: Optional[float] = None) -> None:
        if "loss" in logs and self.model is not None:
            logs = dict(logs)
            logs.update(self.cluster_statistics())
            modules = self.clustered_modules()
            if modules:
                logs["edkm/temperature_factor"] = modules[0][1].temperature_factor
                logs["edkm/clustering"] = float(modules[0][1].clustering_enabled)
            logs["edkm/collapsed_centroids_repaired"] = self._collapsed_since_log
            self._collapsed_since_log = 0
            logs.update(_policy_counters(modules))
        super().log(logs, start_time)

    # --------------------------------------------------------------------------------------- train / save
    def train(self, *args, **kwargs):
        output = super().train(*args, **kwargs)
        if _schedule(self.args).palettize_at_end:
            self.finalize()
        return output

    def finalize(self):
        """Palettize the model in place (nearest centroids, packed indices); returns it."""
        base = _base_model(self.model)
        if not _edkm_config(base).palettized:
            palettize(base)
        return base

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        """Trainer's save, staged in a temporary folder and moved in file by file with config.json last, so an
        interrupted save never leaves weights that do not match the config next to it."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return super()._save(output_dir, state_dict)
        os.makedirs(output_dir, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".edkm-save-", dir=output_dir)
        try:
            super()._save(staging, state_dict)
            names = sorted(os.listdir(staging), key=lambda n: (n == "config.json", n))
            for name in names:
                target = os.path.join(output_dir, name)
                if os.path.isdir(target) and not os.path.islink(target):
                    shutil.rmtree(target)
                os.replace(os.path.join(staging, name), target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _base_model(model):
    """The transformers model under PEFT / DDP wrappers."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    while not hasattr(model, "config") and hasattr(model, "module"):
        model = model.module
    return model


_SCHEDULE_DEFAULTS = {name: f.default for name, f in EDKMTrainingArguments.__dataclass_fields__.items()
                      if name not in TrainingArguments.__dataclass_fields__}


class _ScheduleView:
    """The schedule fields of any TrainingArguments (defaults where plain TrainingArguments lack them)."""

    def __init__(self, args):
        for name, default in _SCHEDULE_DEFAULTS.items():
            setattr(self, name, getattr(args, name, default))


def _schedule(args):
    return args if isinstance(args, EDKMTrainingArguments) else _ScheduleView(args)


def _policy_counters(modules) -> dict:
    """Saved-tensor marshaling / sharding counters, summed over the policies attached to the modules."""
    totals, seen = {}, set()
    for _, module in modules:
        policy = module.saved_tensor_policy
        if policy is None or id(policy) in seen or not hasattr(policy, "counters"):
            continue
        seen.add(id(policy))
        for key, value in policy.counters(reset=True).items():
            totals[f"edkm/{key}"] = totals.get(f"edkm/{key}", 0) + value
    return totals
