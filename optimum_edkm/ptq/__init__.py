"""Post-training palettization: GPTQ's error feedback onto look-up tables ("GPTVQ with vector dimension 1").

GPTQ (Frantar et al., ICLR 2023) rounds a linear layer's weight one input column at a time and pushes each
column's rounding error onto the columns not rounded yet, weighted by the inverse Hessian of the layer's output
error, so that the layer's *output* on calibration inputs stays close to the float one. GPTVQ (van Baalen et al.,
arXiv 2402.15319) does the same onto codebooks. This module does it onto the project's palettized format - one
LUT per tensor or per group of output rows, an optional fp16 per-output-channel scale - for every clustered
linear layer of a model prepared with :func:`optimum_edkm.prepare`, written from the papers' description:

1. **LUT.** k-means on the layer's float weight (:func:`optimum_edkm.clustering.init_centroids`), weighted by an
   importance per weight: ``"hessian"`` - the input second moment ``diag(X^T X)`` of the weight's column (what
   a weight's error costs in the layer's output when errors of different columns do not interact);
   ``"obs"`` - ``1 / [H^-1]_jj``, the optimal-brain-surgeon cost of a column's error when the other columns
   compensate (what GPTQ's own loss counts); ``"fisher"`` - a given Fisher diagonal
   (:func:`optimum_edkm.sensitivity.fisher_diagonal`); ``"none"`` - plain k-means. The LUT is rounded to its
   storage dtype at once, so every later step works with the values that will be stored.
2. **Rounding with error feedback.** Columns in order (or by decreasing Hessian diagonal with ``act_order``:
   free here, since a LUT does not depend on the column order), blocks of ``block_size`` columns with lazy batch
   updates, dampening ``damp * mean(diag H)``. Each column goes to the nearest LUT entry of its row's group
   computed *exactly as hard assignment computes it* (the weight's 16-bit rounding divided by the scale, lowest
   index on ties), so the indices are those :func:`optimum_edkm.palettize` will find.
3. **M-step** (``refits`` rounds): with the indices fixed, the LUT entries (and, with ``refit_scale``, the
   per-channel scales) that minimise the layer's output error ``tr((W - Q) H (W - Q)^T)`` solve a small linear
   least-squares problem per LUT (``2**bits`` unknowns; per row for a scale). The refit LUT then starts another
   rounding pass. Of every candidate (each pass, each refit) the one with the lowest output error is kept.

Layers are processed in the order the model computes them (GPTQ's "true sequential" order: q/k/v, then o,
then gate/up, then down, each calibrated on inputs produced by the already-palettized linears before it;
the next decoder layer sees the palettized layer's outputs).

The result stays a *train-time* model: every ``EDKMLinear`` holds, as its float weight, the decoded palettized
weight ``scale[row] * lut[group, index]`` and, as its centroids, the LUT (plus the scale and an absolute
temperature set as :meth:`~optimum_edkm.nn.ClusteredModule.init_clusters` sets it). Hard assignment
of that weight reproduces the indices, so :func:`optimum_edkm.palettize` gives exactly the post-training model
(checked bit for bit after every module), and eDKM fine-tuning starts from it with weights sitting on their
centroids.

:mod:`.rounding` rounds one weight; :mod:`.model` drives a whole model.
"""

from .model import PostTrainingResult, install_palette, palettize_post_training
from .rounding import (
    IMPORTANCES,
    LutRoundingResult,
    PaletteCandidate,
    gptq_lut_round,
    output_error,
    palettize_weight,
    refit_lut,
    refit_scale,
)

__all__ = [
    "IMPORTANCES",
    "LutRoundingResult",
    "PaletteCandidate",
    "PostTrainingResult",
    "gptq_lut_round",
    "install_palette",
    "output_error",
    "palettize_post_training",
    "palettize_weight",
    "refit_lut",
    "refit_scale",
]
