"""Block-wise reconstruction: each decoder layer of a clustered model trained to reproduce the float layer.

Post-training palettization (:mod:`optimum_edkm.ptq`) fits each linear layer to its own outputs; what a decoder
layer computes after attention's softmax, the MLP's gating and the residual stream is left to chance. Block-wise
reconstruction (BRECQ, OmniQuant, EfficientQAT's Block-AP) trains each decoder layer, fed the outputs of the
layers already compressed, to reproduce the float model's hidden states at its output (mean squared error), so
that the error of earlier layers is corrected where it arises instead of being carried to the logits.

Two things can be trained per layer:

* ``"edkm"``: the float weights of the clustered linears through eDKM's soft clustering (the weights move and may
  change LUT entry; the centroids follow them), palettized again when the layer is done;
* ``"lut"``: only the LUT entries, every weight keeping its entry (:func:`frozen_assignments`; AQLM's and
  GPTVQ's codebook tuning), the cheap baseline.

Either can add the layer's normalisation weights. The model stays a train-time model holding the result (its
weights sit on their centroids), to be fine-tuned further or finalized with :func:`optimum_edkm.palettize`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .calibration.layers import decoder_layers, layer_by_layer, layer_output
from .nn import ClusteredModule, Palette, is_clustered

logger = logging.getLogger(__name__)

#: what block-wise reconstruction and end-to-end tuning train in the clustered linears
TRAINED = ("edkm", "lut")


@dataclasses.dataclass(frozen=True)
class ReconstructionOptions:
    """How each decoder layer is trained to reproduce the float layer.

    Attributes:
        epochs: passes over the calibration sequences per layer (0: no reconstruction).
        learning_rate: Adam's learning rate of what ``train`` names (cosine decay to 0 within each layer).
        norm_learning_rate: learning rate of the layer's normalisation weights (0: frozen).
        batch_size: calibration sequences per step.
        train: ``"edkm"`` (float weights through eDKM) or ``"lut"`` (LUT entries, frozen assignments).
    """

    epochs: int = 2
    learning_rate: float = 1e-5
    norm_learning_rate: float = 0.0
    batch_size: int = 4
    train: str = "edkm"

    def __post_init__(self):
        if self.train not in TRAINED:
            raise ValueError(f"train must be one of {TRAINED}, got {self.train!r}")
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "epochs" else 1):
                raise ValueError(f"ReconstructionOptions.{name} must be an integer >= 1, got {value!r}")
        for name in ("learning_rate", "norm_learning_rate"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < math.inf:
                raise ValueError(f"ReconstructionOptions.{name} must be a finite number >= 0, got {value!r}")


def norm_weights(module: nn.Module) -> list:
    """The 1-D weights of the normalisation layers inside ``module`` (RMSNorm / LayerNorm scales and biases)."""
    return [
        parameter
        for name, parameter in module.named_parameters()
        if parameter.dim() == 1 and "norm" in name.lower() and parameter.is_floating_point()
    ]


class _FrozenAssignment(nn.Module):
    """What a clustered module computes while its assignments are frozen: ``scale[row] * lut[group(row), index]``
    with ``lut`` trainable."""

    def __init__(self, module: ClusteredModule):
        super().__init__()
        indices, _ = module.snap()
        rows = indices.shape[0]
        group_size = module.spec.group_size
        group = torch.zeros(rows, dtype=torch.long) if group_size is None else torch.arange(rows) // group_size
        self.register_buffer("indices", indices.long(), persistent=False)
        self.register_buffer("group", group.to(indices.device), persistent=False)
        self.lut = nn.Parameter(module.weight_centroids.detach().clone().float())

    def dense(self, module: ClusteredModule) -> torch.Tensor:
        dense = self.lut[self.group].gather(1, self.indices)
        if module.weight_scale is not None:
            dense = dense * module.weight_scale.unsqueeze(1)
        return module.rows(dense.to(module.weight.dtype))


@contextlib.contextmanager
def frozen_assignments(modules):
    """Within the context, every clustered module of ``modules`` keeps the LUT entry each weight snaps to now and
    computes its weight from a trainable copy of its LUT; yields ``{module: lut parameter}``. On exit the trained
    LUT (rounded to the LUT's storage dtype) is written back through :meth:`ClusteredModule.start_from`, so the
    modules hold exactly the palettization that was trained."""
    modules = [m for m in modules if is_clustered(m)]
    frozen = {m: _FrozenAssignment(m) for m in modules}
    for module, state in frozen.items():
        # a submodule, so that model.parameters() (an optimizer built by Trainer) sees the LUT
        module.frozen_assignment = state
        module.clustered_weight = lambda module=module, state=state: state.dense(module)
    try:
        yield {module: state.lut for module, state in frozen.items()}
    finally:
        for module, state in frozen.items():
            del module.clustered_weight
            del module.frozen_assignment
        with torch.no_grad():
            for module, state in frozen.items():
                palette = Palette.from_indices(
                    module.palette_format, state.indices.to(torch.uint8), state.lut.detach(), module.weight_scale
                )
                module.start_from(palette)


def _cosine(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / max(steps, 1)))
    )


def _mean_error(layer: nn.Module, calls: list, targets: list) -> tuple:
    """(outputs, mean squared error to the targets) of the layer in eval mode (snapped weights)."""
    with torch.no_grad():
        outputs = [layer_output(layer(*call.args, **call.kwargs)) for call in calls]
        error = sum(F.mse_loss(o.float(), t.float()).item() for o, t in zip(outputs, targets)) / len(calls)
    return outputs, error


def _train_layer(layer: nn.Module, calls: list, targets: list, options: ReconstructionOptions, seed: int) -> list:
    clustered = [m for m in layer.modules() if is_clustered(m)]
    flags = {p: p.requires_grad for p in layer.parameters()}
    for parameter in layer.parameters():
        parameter.requires_grad_(False)
    context = frozen_assignments(clustered) if options.train == "lut" else contextlib.nullcontext(None)
    losses = []
    with context as luts:
        trained = list(luts.values()) if luts is not None else [m.weight for m in clustered]
        groups = [{"params": trained, "lr": options.learning_rate}]
        norms = norm_weights(layer) if options.norm_learning_rate > 0 else []
        if norms:
            groups.append({"params": norms, "lr": options.norm_learning_rate})
        for group in groups:
            for parameter in group["params"]:
                parameter.requires_grad_(True)
        optimizer = torch.optim.Adam(groups)
        steps = options.epochs * len(calls)
        schedule = _cosine(optimizer, steps)
        generator = torch.Generator().manual_seed(seed)
        layer.train()
        for _ in range(options.epochs):
            for index in torch.randperm(len(calls), generator=generator).tolist():
                call, target = calls[index], targets[index]
                loss = F.mse_loss(layer_output(layer(*call.args, **call.kwargs)).float(), target.float())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                losses.append(loss.item())
        layer.eval()
    for parameter, flag in flags.items():
        parameter.requires_grad_(flag)
    return losses


def _snapshot(layer: nn.Module) -> tuple:
    """What :func:`_restore` needs to put ``layer`` back: its tensors and each clustered module's palettization
    (whose indices :meth:`ClusteredModule.start_from` pins exactly)."""
    state = {key: tensor.detach().clone() for key, tensor in layer.state_dict().items()}
    return state, {m: m.palette() for m in layer.modules() if is_clustered(m)}


@torch.no_grad()
def _restore(layer: nn.Module, saved: tuple) -> None:
    state, palettes = saved
    layer.load_state_dict(state)
    for module, palette in palettes.items():
        # indices pinned by start_from (near-duplicate LUT entries) are not in the state dict: pin them again
        # (the weights were then the decoded values, which start_from writes back unchanged)
        if not torch.equal(module.nearest_indices(), palette.indices().to(module.weight.device)):
            module.start_from(palette)


def reconstruct_blocks(
    model,
    teacher,
    calibration_ids: torch.Tensor,
    options: ReconstructionOptions = ReconstructionOptions(),
    seed: int = 0,
    progress: bool = True,
) -> list:
    """Train each decoder layer of the clustered ``model`` to reproduce ``teacher``'s (the float model's) layer
    outputs on ``calibration_ids`` (``[n, seq_len]``), fed the outputs of ``model``'s layers before it.

    Returns per layer ``{"layer", "error_before", "error_after", "trained_kept", "seconds", "losses"}`` (mean
    squared error of the layer's output against the float model's, with snapped weights, before and after
    training; a layer whose error training did not lower is put back as it was, ``trained_kept`` False)."""
    if options.epochs == 0:
        return []
    if len(decoder_layers(model)) != len(decoder_layers(teacher)):
        raise ValueError("the teacher must be the float model the clustered model was made from (same layers)")
    was_training = model.training
    model.eval()
    teacher.eval()
    history = []
    try:
        steps = zip(
            layer_by_layer(model, calibration_ids, options.batch_size),
            layer_by_layer(teacher, calibration_ids, options.batch_size),
        )
        for step, float_step in tqdm(
            steps,
            total=len(decoder_layers(model)),
            desc="block-wise reconstruction",
            unit="layer",
            disable=not progress,
        ):
            started = time.perf_counter()
            with torch.no_grad():
                targets = [layer_output(float_step.layer(*c.args, **c.kwargs)) for c in float_step.calls]
            float_step.outputs = targets  # the float model's own hidden states feed its next layer
            outputs_before, before = _mean_error(step.layer, step.calls, targets)
            saved = _snapshot(step.layer)
            losses = _train_layer(step.layer, step.calls, targets, options, seed + step.index)
            step.outputs, after = _mean_error(step.layer, step.calls, targets)
            # a layer whose error training did not lower (a learning rate too high for this model's weights)
            # keeps its start, so that the stage never makes a layer worse on the calibration windows
            kept = after <= before
            if not kept:
                _restore(step.layer, saved)
                step.outputs, after = outputs_before, before
            seconds = time.perf_counter() - started
            history.append(
                {
                    "layer": step.index,
                    "error_before": before,
                    "error_after": after,
                    "trained_kept": kept,
                    "seconds": seconds,
                    "losses": losses,
                }
            )
            logger.info(
                "block-wise reconstruction: layer %d, error %.4g -> %.4g (%.1f s)", step.index, before, after, seconds
            )
    finally:
        model.train(was_training)
    return history
