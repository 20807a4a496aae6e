"""Clustering-aware fine-tuning with the ``transformers.Trainer`` users already know.

* :class:`ClusteringScheduleCallback` - the clustering schedule as a ``TrainerCallback`` that works with a
  plain ``Trainer`` too: clustering starts after ``clustering_milestone`` steps (centroids re-initialised by
  k-means from the fine-tuned weights), the softmax temperature can be annealed, and centroids that collapse
  onto a neighbour are spread again.
* :class:`EDKMTrainer` - ``Trainer`` plus that callback, cluster statistics in the logs, distillation from a
  float teacher, marshaling of what the clustering keeps for backward (``offload_saved_tensors`` /
  ``shard_saved_tensors``), atomic saves and :meth:`EDKMTrainer.finalize` (palettize explicitly; or
  ``palettize_at_end=True``).

Everything the schedule depends on is a function of ``state.global_step`` (saved by Trainer) or lives in the
model's state dict (centroids, temperatures, scales), so ``resume_from_checkpoint`` continues exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Optional, Union

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from .api import edkm_config, owns_model_file, palettize
from .atomic import commit_folder
from .losses import DIVERGENCES, distillation_term
from .marshaling.training import saved_tensor_policy
from .nn import is_clustered
from .validation import check_int

TEMPERATURE_SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class ClusteringSchedule:
    """When clustering runs and how its temperature moves (see :class:`EDKMTrainingArguments` for the fields)."""

    clustering_milestone: int = 0
    temperature_schedule: str = "constant"
    final_temperature_factor: float = 0.1
    collapse_tolerance: float = 1e-3

    def __post_init__(self):
        check_int(self.clustering_milestone, "clustering_milestone", minimum=0)
        if self.temperature_schedule not in TEMPERATURE_SCHEDULES:
            raise ValueError(
                f"temperature_schedule must be one of {TEMPERATURE_SCHEDULES}, got {self.temperature_schedule!r}"
            )
        if not 0 < self.final_temperature_factor or not math.isfinite(self.final_temperature_factor):
            raise ValueError(
                f"final_temperature_factor must be a finite number > 0, got {self.final_temperature_factor!r}"
            )
        if not self.collapse_tolerance >= 0:
            raise ValueError(f"collapse_tolerance must be >= 0, got {self.collapse_tolerance!r}")

    @classmethod
    def from_arguments(cls, args) -> "ClusteringSchedule":
        """The schedule fields of any ``TrainingArguments`` (the defaults where plain ones lack them)."""
        return cls(**{f.name: getattr(args, f.name, f.default) for f in fields(cls)})

    def temperature_factor(self, step: int, max_steps: int) -> float:
        """Multiplier of every module's temperature at optimizer step ``step``."""
        if self.temperature_schedule == "constant" or max_steps <= self.clustering_milestone:
            return 1.0
        progress = min(max(step - self.clustering_milestone, 0) / (max_steps - self.clustering_milestone), 1.0)
        final = self.final_temperature_factor
        if self.temperature_schedule == "linear":
            return 1.0 + (final - 1.0) * progress
        return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _option(default, help: str):
    """A field with a default and the help text ``HfArgumentParser`` shows for it."""
    return field(default=default, metadata={"help": help})


@dataclass
class EDKMTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the clustering schedule and the training-time options of eDKM."""

    clustering_milestone: int = _option(
        0,
        "optimizer steps of plain fine-tuning before clustering starts (centroids are re-initialised "
        "from the weights at that step)",
    )
    temperature_schedule: str = _option(
        "constant",
        "'constant', or anneal the temperature from its initial value to final_temperature_factor "
        "times it with a 'linear' or 'cosine' schedule after the milestone",
    )
    final_temperature_factor: float = _option(0.1, "end of the temperature schedule")
    collapse_tolerance: float = _option(
        1e-3,
        "centroids closer than this fraction of the mean centroid spacing are treated as collapsed and "
        "spread again before the step; 0 disables the repair",
    )
    cluster_stats_sample: int = _option(
        65536, "weights per module sampled (fixed positions) for the logged cluster statistics"
    )
    palettize_at_end: bool = _option(
        False,
        "snap the model to its palettized form when train() finishes (otherwise call trainer.finalize() "
        "or optimum_edkm.palettize(model) when you are done training)",
    )
    distillation_weight: float = _option(
        0.0,
        "weight of the distillation loss (KL divergence to the teacher's next-token distribution); the "
        "loss is (1 - w) * cross-entropy + w * KL. Needs EDKMTrainer(teacher_model=...)",
    )
    distillation_temperature: float = _option(
        1.0, "softmax temperature of the distillation loss (the KL term is multiplied by its square)"
    )
    distillation_loss: str = _option(
        "forward_kl", f"divergence to the teacher, one of {DIVERGENCES} (optimum_edkm.losses.token_divergence)"
    )
    offload_saved_tensors: Union[bool, str] = _option(
        False, "move what the clustering saves for backward to the CPU (True) or another device"
    )
    shard_saved_tensors: bool = _option(
        False, "under data parallelism, keep only this rank's slice of what the clustering saves for backward"
    )

    def __post_init__(self):
        super().__post_init__()
        ClusteringSchedule.from_arguments(self)  # validates the schedule fields
        check_int(self.cluster_stats_sample, "cluster_stats_sample", minimum=1)
        if not 0 <= self.distillation_weight <= 1:
            raise ValueError(f"distillation_weight must be in [0, 1], got {self.distillation_weight!r}")
        if not self.distillation_temperature > 0:
            raise ValueError(f"distillation_temperature must be > 0, got {self.distillation_temperature!r}")
        if self.distillation_loss not in DIVERGENCES:
            raise ValueError(f"distillation_loss must be one of {DIVERGENCES}, got {self.distillation_loss!r}")


def temperature_factor(args, step: int, max_steps: int) -> float:
    """Multiplier of every module's temperature at optimizer step ``step`` under ``args``' schedule."""
    return ClusteringSchedule.from_arguments(args).temperature_factor(step, max_steps)


def base_model(model):
    """The transformers model under PEFT / DDP / FSDP wrappers."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    while not hasattr(model, "config") and hasattr(model, "module"):
        model = model.module
    return model


def clustered_modules(model) -> list:
    return [(name, module) for name, module in base_model(model).named_modules() if is_clustered(module)]


class ClusteringScheduleCallback(TrainerCallback):
    """Applies the clustering schedule at the start of training and of every optimizer step. Works with a plain
    ``Trainer``: ``Trainer(..., callbacks=[ClusteringScheduleCallback()])`` (the schedule then comes from the
    arguments' fields if they have them, else from ``schedule``)."""

    def __init__(self, schedule: Optional[ClusteringSchedule] = None, seed: Optional[int] = None):
        self.schedule = schedule
        self.seed = seed
        self.collapsed_since_log = 0
        self._milestone_initialised = False

    def _schedule(self, args) -> ClusteringSchedule:
        return self.schedule if self.schedule is not None else ClusteringSchedule.from_arguments(args)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        schedule = self._schedule(args)
        if schedule.clustering_milestone > 0 and schedule.clustering_milestone >= state.max_steps:
            raise ValueError(
                f"clustering_milestone={schedule.clustering_milestone} is at or beyond max_steps={state.max_steps}: "
                f"clustering would never run and palettizing would snap the model to its pre-training centroids; "
                f"lower clustering_milestone or raise max_steps"
            )
        self.apply(model, state.global_step, state.max_steps, starting=True, args=args)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.apply(model, state.global_step, state.max_steps, starting=False, args=args)

    @torch.no_grad()
    def apply(self, model, step: int, max_steps: int, starting: bool, args=None) -> None:
        schedule = self._schedule(args)
        modules = clustered_modules(model)
        active = step >= schedule.clustering_milestone
        factor = schedule.temperature_factor(step, max_steps)
        for _, module in modules:
            module.clustering_enabled = active
            module.temperature_factor = factor
        if (
            active
            and schedule.clustering_milestone > 0
            and step == schedule.clustering_milestone
            and not self._milestone_initialised
        ):
            # the weights moved during plain fine-tuning: start clustering from their current k-means
            seed = self.seed if self.seed is not None else edkm_config(base_model(model)).seed
            for name, module in modules:
                module.init_clusters(seed=seed, name=f"{name}.weight")
            self._milestone_initialised = True
        if active and schedule.collapse_tolerance > 0 and not starting:
            for _, module in modules:
                self.collapsed_since_log += module.repair_collapsed_centroids(schedule.collapse_tolerance)


class EDKMTrainer(Trainer):
    """``transformers.Trainer`` for models loaded with ``quantization_config=EDKMConfig(...)``.

    Takes :class:`EDKMTrainingArguments` (plain ``TrainingArguments`` also work, with the schedule's defaults).
    Call :meth:`finalize` (or ``optimum_edkm.palettize(model)``) once training is done, or set
    ``palettize_at_end=True``.
    """

    def __init__(self, model=None, args: Optional[TrainingArguments] = None, *positional, teacher_model=None, **kwargs):
        if args is None:
            raise ValueError("EDKMTrainer needs args=EDKMTrainingArguments(output_dir=...)")
        if getattr(args, "distillation_weight", 0.0) > 0 and teacher_model is None:
            raise ValueError(
                "distillation_weight > 0 needs a teacher: EDKMTrainer(..., teacher_model=<the float model>)"
            )
        self._check_trainable(model)
        super().__init__(model, args, *positional, **kwargs)
        self.edkm_config = edkm_config(base_model(model))
        self.teacher_model = teacher_model
        if teacher_model is not None:
            teacher_model.eval().requires_grad_(False)
            teacher_model.to(self.args.device)
        self.schedule_callback = ClusteringScheduleCallback(seed=self.edkm_config.seed)
        self.add_callback(self.schedule_callback)
        self._sample_positions = {}
        self._last_labels = {}

    @staticmethod
    def _check_trainable(model) -> None:
        config = edkm_config(base_model(model))
        if config.palettized or not clustered_modules(model):
            raise ValueError(
                "the model is already palettized (LUTs and indices only): there are no float weights "
                "left to fine-tune; load the float or train-format checkpoint instead"
            )

    def clustered_modules(self):
        return clustered_modules(self.model)

    def _apply_schedule(self, step: int, max_steps: int, starting: bool) -> None:
        self.schedule_callback.apply(self.model, step, max_steps, starting, args=self.args)

    # ------------------------------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Trainer's loss, mixed with the KL divergence to the teacher when ``distillation_weight > 0``."""
        weight = getattr(self.args, "distillation_weight", 0.0)
        if self.teacher_model is None or weight == 0 or not model.training:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        labels = inputs.get("labels")
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        with torch.no_grad():
            teacher_logits = self.teacher_model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        distillation = distillation_term(
            outputs.logits,
            teacher_logits,
            labels,
            getattr(self.args, "distillation_loss", "forward_kl"),
            self.args.distillation_temperature,
            num_items_in_batch,
        )
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
        sample_size = getattr(self.args, "cluster_stats_sample", 65536)
        for name, module in self.clustered_modules():
            if not module.clustering_enabled:
                continue
            numel = module.weight.numel()
            if name not in self._sample_positions:
                generator = torch.Generator().manual_seed(self.edkm_config.seed)
                count = min(numel, sample_size)
                positions = torch.randperm(numel, generator=generator)[:count] if count < numel else torch.arange(numel)
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
            logs["edkm/collapsed_centroids_repaired"] = self.schedule_callback.collapsed_since_log
            self.schedule_callback.collapsed_since_log = 0
            logs.update(_policy_counters(modules))
        super().log(logs, start_time)

    # --------------------------------------------------------------------------------------- train / save
    def train(self, *args, **kwargs):
        self._check_trainable(self.model)
        offload = getattr(self.args, "offload_saved_tensors", False)
        shard = getattr(self.args, "shard_saved_tensors", False)
        if offload or shard:
            with saved_tensor_policy(base_model(self.model), offload=offload, shard=shard):
                output = super().train(*args, **kwargs)
        else:
            output = super().train(*args, **kwargs)
        if getattr(self.args, "palettize_at_end", False):
            self.finalize()
        return output

    def finalize(self):
        """Palettize the model in place (nearest centroids, packed indices); returns it."""
        base = base_model(self.model)
        if not edkm_config(base).palettized:
            palettize(base)
        return base

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        """Trainer's save through the package's atomic folder commit (:func:`optimum_edkm.atomic.commit_folder`):
        an interrupted save never leaves new weights beside an old config; stale weight shards are removed and
        other files kept."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return super()._save(output_dir, state_dict)
        commit_folder(
            output_dir, lambda staging: super(EDKMTrainer, self)._save(staging, state_dict), owns=owns_model_file
        )


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
