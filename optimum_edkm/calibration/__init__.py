"""Calibration on a decoder-only model, the layer under post-training palettization (:mod:`optimum_edkm.ptq`) and
the RTN / GPTQ / AWQ baselines (:mod:`optimum_edkm.baselines`): walking the decoder layers with each layer's own
calls (:mod:`.layers`), the Hessians of the linears' inputs, and GPTQ's error feedback (:mod:`.error_feedback`).
Pure torch and transformers model walking; nothing here knows eDKM's modules."""

from .error_feedback import (
    check_block_and_damp,
    dampen,
    error_feedback,
    single_cpu_thread,
    upper_cholesky_of_inverse,
    working_copies,
)
from .layers import (
    LayerCall,
    LayerStep,
    capture_layer_calls,
    check_calibration_ids,
    decoder_layers,
    for_each_hessian,
    input_hessians,
    layer_by_layer,
    layer_output,
    module_names,
    named_linears,
    run_layer,
    sequential_groups,
    weight_rows,
)

__all__ = [
    "LayerCall",
    "LayerStep",
    "capture_layer_calls",
    "check_block_and_damp",
    "check_calibration_ids",
    "dampen",
    "decoder_layers",
    "error_feedback",
    "for_each_hessian",
    "input_hessians",
    "layer_by_layer",
    "layer_output",
    "module_names",
    "named_linears",
    "run_layer",
    "sequential_groups",
    "single_cpu_thread",
    "upper_cholesky_of_inverse",
    "weight_rows",
    "working_copies",
]
