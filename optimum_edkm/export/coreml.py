"""Export a palettized model to a Core ML ``.mlpackage`` whose clustered weights are ``constexpr_lut_to_dense``
ops (n-bit indices + our own LUTs), plus a framework-neutral manifest and the palettized tensors beside it.

How: every palettized module of a structural copy of the model becomes a float ``nn.Linear`` /
``nn.Embedding`` holding its decoded weight and carrying coremltools' compression-info buffers
(``_COREML_/weight/lut``, ``.../palettization_scale``); ``ct.convert`` then emits LUT ops with our LUTs. The
converter recomputes the indices as the *nearest* LUT entry, so exactness is proven twice: before conversion
every handed-over weight must lie exactly on its LUT entry, and after conversion the saved package is decoded
independently and compared bit for bit with the torch modules (:func:`optimum_edkm.export.verify_coreml`).
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from ..nn import PalettizedEmbedding, is_palettized
from .errors import CoreMLExportError, ExactnessError, import_coremltools
from .targets import DeploymentTarget, check_target, resolve_target

#: attribute under which the wrapper holds the model; converted op names start with it ("lm_model_layers_0...")
WRAPPER_ATTRIBUTE = "lm"
INPUT_NAME = "input_ids"
OUTPUT_NAME = "logits"
METADATA_PREFIX = "optimum_edkm."
CAPTURES = ("trace", "export")


def palettized_modules(model) -> dict:
    """``{name: module}`` of the palettized modules, in model order."""
    return {name: module for name, module in model.named_modules() if is_palettized(module)}


def package_stem(path: str) -> str:
    return path[: -len(".mlpackage")] if path.endswith(".mlpackage") else path


def manifest_path_for(path: str) -> str:
    """``out/model.mlpackage`` -> ``out/model.manifest.json``."""
    return package_stem(path) + ".manifest.json"


def tensors_path_for(path: str) -> str:
    """``out/model.mlpackage`` -> ``out/model.palettized.safetensors``."""
    return package_stem(path) + ".palettized.safetensors"


class FixedLengthLogits(nn.Module):
    """Logits for one window of ``seq_len`` tokens, without KV cache.

    The causal mask (additive, 4-D) and the position ids are constants of the graph: transformers 5 derives
    them from a missing mask with ``torch.diff`` / ``new_ones``, which coremltools 9.0 cannot convert.
    """

    def __init__(self, model: nn.Module, seq_len: int):
        super().__init__()
        setattr(self, WRAPPER_ATTRIBUTE, model)
        mask = torch.full((seq_len, seq_len), float("-inf")).triu(1)
        self.register_buffer("mask", mask[None, None].to(_float_dtype(model)))
        self.register_buffer("position_ids", torch.arange(seq_len)[None])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        model = getattr(self, WRAPPER_ATTRIBUTE)
        return model(input_ids=input_ids, attention_mask=self.mask, position_ids=self.position_ids,
                     use_cache=False, return_dict=False)[0]


def _float_dtype(model: nn.Module) -> torch.dtype:
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32


# ------------------------------------------------------------------------------------------- checks
def check_exportable(model, path: str, *, seq_len: int, batch_size: int, target: DeploymentTarget,
                     capture: str) -> dict:
    """Every check that needs no conversion; returns the palettized modules."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path).endswith(".mlpackage"):
        raise CoreMLExportError(f"path must name an .mlpackage directory (e.g. 'model.mlpackage'), got {path!r}")
    if capture not in CAPTURES:
        raise CoreMLExportError(f"capture must be one of {CAPTURES}, got {capture!r}")
    for label, value in (("seq_len", seq_len), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CoreMLExportError(f"{label} must be a positive integer, got {value!r}")
    config = getattr(model, "config", None)
    quantization = getattr(config, "quantization_config", None)
    modules = palettized_modules(model)
    if getattr(quantization, "quant_method", None) != "edkm" or not modules:
        raise CoreMLExportError(
            "the model has no palettized module: call optimum_edkm.palettize(model) after training, or load a "
            "saved palettized model with AutoModelForCausalLM.from_pretrained(path) after `import optimum_edkm`")
    elsewhere = {str(t.device) for t in list(model.parameters()) + list(model.buffers()) if t.device.type != "cpu"}
    if elsewhere:
        raise CoreMLExportError(f"the model has tensors on {', '.join(sorted(elsewhere))}; the Core ML converter "
                                f"works on CPU tensors: call model.cpu() before exporting")
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        raise CoreMLExportError(f"seq_len={seq_len} exceeds the model's max_position_embeddings={limit}")
    check_target(modules, target)
    for name, module in modules.items():
        check_representable(name, module)
    return modules


def check_representable(name: str, module) -> None:
    """The LUT and scale must be finite fp16 values (Core ML stores them in fp16), the scale non-zero (the
    converter divides by it)."""
    for label, tensor in (("weight_lut", module.weight_lut), ("weight_scale", module.weight_scale)):
        if tensor is None:
            continue
        values = tensor.detach().float()
        if not bool(torch.isfinite(values).all()):
            raise ExactnessError(f"'{name}.{label}' holds non-finite values; Core ML cannot store them")
        if not torch.equal(values.half().float(), values):
            raise ExactnessError(
                f"'{name}.{label}' holds values that float16 cannot represent exactly ({tensor.dtype} LUT); the "
                f"Core ML package stores float16, which would re-approximate the clustered weights. Palettize "
                f"with EDKMConfig(lut_dtype='float16')")
    if module.weight_scale is not None and bool((module.weight_scale == 0).any()):
        row = int((module.weight_scale == 0).nonzero()[0])
        raise ExactnessError(f"'{name}.weight_scale' is 0 for output channel {row}; the converter divides the "
                             f"weight by it, so the channel cannot be exported exactly")


@torch.no_grad()
def check_on_lut(name: str, module, weight: torch.Tensor) -> None:
    """Prove that the float ``weight`` handed to the converter lies exactly on the LUT entry of ``module``'s
    own index, after the division by the per-channel scale that the converter performs. The converter picks
    the nearest entry, so an exact hit means it picks this entry or an identical one: no re-approximation."""
    indices = module.indices().long()
    rows = indices.shape[0]
    if tuple(weight.shape) != tuple(indices.shape):
        raise ExactnessError(f"'{name}.weight': exported weight has shape {tuple(weight.shape)}, the palettized "
                             f"module has {tuple(indices.shape)}")
    values = weight.float()
    if module.weight_scale is not None:
        values = values / module.weight_scale.float().view(-1, 1)
    lut = module.weight_lut.float()
    rows_per_group = rows // lut.shape[0]
    group = (torch.arange(rows) // rows_per_group).view(-1, 1).expand_as(indices)
    expected = lut[group, indices]
    off = values != expected
    if bool(off.any()):
        row, column = (int(i) for i in off.nonzero()[0])
        raise ExactnessError(
            f"'{name}.weight' is not exactly on its LUT: {int(off.sum())} of {off.numel()} exported weights differ "
            f"from lut[group, index]{' (after dividing by weight_scale)' if module.weight_scale is not None else ''}, "
            f"first at [{row}, {column}]: {float(values[row, column])!r} vs lut[{int(group[row, column])}, "
            f"{int(indices[row, column])}] = {float(expected[row, column])!r}. The converter would silently re-snap "
            f"it to the nearest entry; export the palettized module unchanged")


# ------------------------------------------------------------------------------------------ export copy
def _float_module(module) -> nn.Module:
    dense = module.dense_weight(torch.float32)
    if isinstance(module, PalettizedEmbedding):
        plain = nn.Embedding(module.num_embeddings, module.embedding_dim, padding_idx=module.padding_idx)
    else:
        plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        if module.bias is not None:
            plain.bias = nn.Parameter(module.bias.detach().float(), requires_grad=False)
    plain.weight = nn.Parameter(dense, requires_grad=False)
    groups, entries = module.weight_lut.shape
    # compression-info protocol v1: the LUT has the weight's rank + 2: (groups along out, along in, 2**bits, 1)
    plain.register_buffer("_COREML_/weight/compression_type", torch.tensor([2]))
    plain.register_buffer("_COREML_/weight/lut", module.weight_lut.detach().float().reshape(groups, 1, entries, 1))
    if module.weight_scale is not None:
        plain.register_buffer("_COREML_/weight/palettization_scale",
                              module.weight_scale.detach().float().reshape(-1, 1))
    return plain


@torch.no_grad()
def export_copy(model, modules: Optional[dict] = None) -> nn.Module:
    """A float32 copy of ``model`` for conversion: palettized modules become float modules with Core ML
    compression info, checked to lie exactly on their LUTs. fp32 tensors are shared with ``model``, not copied."""
    modules = palettized_modules(model) if modules is None else modules
    shared = {id(t): t for t in list(model.parameters()) + list(model.buffers()) if t.dtype == torch.float32}
    shared.update({id(t): t for module in modules.values() for t in module.buffers()})
    clone = copy.deepcopy(model, memo=dict(shared))
    for name, module in modules.items():
        plain = _float_module(module)
        check_on_lut(name, module, plain.weight)
        clone.set_submodule(name, plain)
    # deep-copied (non-fp32) tensors are the copy's own, so converting them leaves ``model`` untouched
    for submodule in clone.modules():
        for key, tensor in list(submodule._parameters.items()):
            if tensor is not None and tensor.is_floating_point() and tensor.dtype != torch.float32:
                submodule._parameters[key] = nn.Parameter(tensor.detach().float(), requires_grad=False)
        for key, tensor in list(submodule._buffers.items()):
            if tensor is not None and tensor.is_floating_point() and tensor.dtype != torch.float32:
                submodule._buffers[key] = tensor.float()
    clone.register_buffer("_COREML_/metadata_version", torch.tensor(1))
    return clone.eval()


def reference_input_ids(vocab_size: int, batch_size: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)


@torch.no_grad()
def check_wrapper(model, wrapper: nn.Module, input_ids: torch.Tensor) -> float:
    """The fixed-length graph must compute the model's own logits (``model`` is the module the wrapper
    holds); otherwise the architecture does not take an explicit additive 4-D mask and the export would be
    wrong."""
    reference = model(input_ids=input_ids, use_cache=False).logits.float()
    traced = wrapper(input_ids).float()
    difference = float((traced - reference).abs().max())
    tolerance = 1e-3 * max(1.0, float(reference.abs().max()))
    if not difference <= tolerance:
        raise CoreMLExportError(
            f"the fixed-length export graph (explicit 4-D causal mask and position ids, no cache) does not "
            f"reproduce model(input_ids).logits (max abs diff {difference:.3g} > {tolerance:.3g}): "
            f"{type(model).__name__} does not accept an additive 4-D attention mask, so it cannot be exported "
            f"this way")
    return difference


# --------------------------------------------------------------------------------------------- export
@dataclass
class CoreMLExport:
    """What :func:`to_coreml` wrote."""

    path: str
    manifest_path: Optional[str]
    tensors_path: Optional[str]
    target: str
    spec_version: int
    modules: int
    op_counts: dict
    weight_bin_bytes: int
    package_bytes: int
    verification: object = None


def _check_toolchain(ct, capture: str) -> None:
    import numpy

    numpy_version = tuple(int(part) for part in numpy.__version__.split(".")[:2])
    if capture == "trace" and ct.__version__.startswith("9.0") and numpy_version >= (2, 4):
        raise CoreMLExportError(
            f"coremltools {ct.__version__} cannot convert traced transformers models with numpy "
            f"{numpy.__version__} (TypeError: only 0-dimensional arrays can be converted to Python scalars): "
            f'install numpy<2.4 (pip install "optimum-edkm[coreml]") or pass capture="export"')


def _register_alias_op(ct) -> None:
    """coremltools 9.0 lacks ``aten.alias`` (from transformers' ``slice_logits_to_keep`` under torch.export);
    it is an identity, registered only when the installed coremltools has none."""
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY, register_torch_op

    if _TORCH_OPS_REGISTRY.get_func("alias") is not None:
        return

    def alias(context, node):
        context.add(_get_inputs(context, node, expected=1)[0], node.name)

    register_torch_op(alias)


def _capture(wrapper: nn.Module, example: torch.Tensor, capture: str, ct):
    if capture == "trace":
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return torch.jit.trace(wrapper, example, strict=False)
    _register_alias_op(ct)
    return torch.export.export(wrapper, (example,), strict=False).run_decompositions({})


def _metadata(model, target: DeploymentTarget, seq_len: int, batch_size: int, capture: str) -> dict:
    import json

    from .. import __version__

    quantization = model.config.quantization_config
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    return {
        "version": __version__,
        "quantization_config": json.dumps(quantization.to_dict(), sort_keys=True),
        "model_config": json.dumps(config, sort_keys=True, default=str),
        "minimum_deployment_target": target.name,
        "seq_len": str(seq_len),
        "batch_size": str(batch_size),
        "capture": capture,
        "palettized_modules": str(len(palettized_modules(model))),
    }


def _package_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


def to_coreml(model, path: str, *, seq_len: int = 64, minimum_deployment_target="iOS18", batch_size: int = 1,
              capture: str = "trace", overwrite: bool = False, manifest: bool = True, tensors: bool = True,
              check_logits: bool = True) -> CoreMLExport:
    """Export a palettized causal LM to ``path`` (an ``.mlpackage``) with LUT-compressed weights.

    Args:
        model: a transformers causal LM after :func:`optimum_edkm.palettize` (or loaded palettized).
        path: the ``.mlpackage`` directory to write (written to a temporary directory, then renamed).
        seq_len, batch_size: the fixed input shape ``[batch_size, seq_len]`` of ``input_ids`` (int32); the
            output ``logits`` is ``[batch_size, seq_len, vocab]`` (fp16). No KV cache.
        minimum_deployment_target: ``"iOS18"`` (default; also ``macOS15``, ``iOS26``...) stores every
            optimum-edkm layout. ``"iOS16"``/``"iOS17"`` (and the macOS13/14 equivalents) only per-tensor LUTs
            of 1/2/4/6/8 bits without per-channel scale; anything else raises before any work.
        capture: ``"trace"`` (``torch.jit.trace``, needs numpy<2.4 with coremltools 9.0) or ``"export"``
            (``torch.export``).
        overwrite: replace an existing package (and its manifest / tensors file).
        manifest: write ``<stem>.manifest.json`` (framework-neutral description, see docs/export.md).
        tensors: write ``<stem>.palettized.safetensors`` (packed indices, LUTs, scales, named as in the
            optimum-edkm checkpoint) so that other runtimes can consume the same palettized weights.
        check_logits: also compare, before the package is put in place, the logits of a torch model rebuilt
            from the package's weights with the model's own (costs a float copy of the model and a forward).

    Raises:
        CoreMLExportError: the request cannot be met (target, path, model); raised before conversion.
        ExactnessError: a weight is not exactly on its LUT (before conversion).
        VerificationError: the converted package does not hold the palettized weights exactly (nothing is
            written then).
        ImportError: coremltools is missing (``pip install "optimum-edkm[coreml]"``).
    """
    target = resolve_target(minimum_deployment_target)
    path = os.path.abspath(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else path
    modules = check_exportable(model, path, seq_len=seq_len, batch_size=batch_size, target=target, capture=capture)
    existing = [p for p in (path, manifest_path_for(path), tensors_path_for(path)) if os.path.exists(p)]
    if existing and not overwrite:
        raise CoreMLExportError(f"{existing[0]} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    ct = import_coremltools()
    _check_toolchain(ct, capture)
    import numpy as np

    from .manifest import build_manifest, write_json_atomic, write_tensors
    from .verify import verify_coreml

    was_training = model.training
    model.eval()
    try:
        clone = export_copy(model, modules)
        wrapper = FixedLengthLogits(clone, seq_len).eval()
        example = reference_input_ids(model.config.vocab_size, batch_size, seq_len)
        check_wrapper(clone, wrapper, example)
        source = _capture(wrapper, example, capture, ct)
        mlmodel = ct.convert(
            source,
            inputs=[ct.TensorType(name=INPUT_NAME, shape=(batch_size, seq_len), dtype=np.int32)],
            outputs=[ct.TensorType(name=OUTPUT_NAME)],
            convert_to="mlprogram",
            minimum_deployment_target=getattr(ct.target, target.name),
            compute_precision=ct.precision.FLOAT16,
        )
        del source, wrapper, clone
        from .. import __version__

        for key, value in _metadata(model, target, seq_len, batch_size, capture).items():
            mlmodel.user_defined_metadata[METADATA_PREFIX + key] = value
        mlmodel.author = f"optimum-edkm {__version__}"
        mlmodel.version = __version__
        mlmodel.short_description = (f"{type(model).__name__} with eDKM-palettized weights "
                                     f"({len(modules)} LUT-compressed modules); logits of a fixed "
                                     f"{seq_len}-token window, no KV cache")
        mlmodel.input_description[INPUT_NAME] = f"token ids, int32 [{batch_size}, {seq_len}]"
        mlmodel.output_description[OUTPUT_NAME] = "next-token logits for every position (fp16)"

        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".edkm-coreml-", dir=parent)
        try:
            staged = os.path.join(staging, os.path.basename(path))
            mlmodel.save(staged)
            del mlmodel
            report = verify_coreml(staged, model, minimum_deployment_target=target.name, manifest=None,
                                   check_logits=check_logits)
            staged_tensors = os.path.join(staging, os.path.basename(tensors_path_for(path)))
            if tensors:
                write_tensors(model, modules, staged_tensors)
            if manifest:
                document = build_manifest(model, modules, report, package=os.path.basename(path),
                                          tensors_file=os.path.basename(tensors_path_for(path)) if tensors else None,
                                          target=target, seq_len=seq_len, batch_size=batch_size, capture=capture)
                write_json_atomic(os.path.join(staging, os.path.basename(manifest_path_for(path))), document)
            # a manifest means a complete export: an earlier one goes first, the new one comes last
            if os.path.exists(manifest_path_for(path)):
                os.remove(manifest_path_for(path))
            if tensors:
                os.replace(staged_tensors, tensors_path_for(path))
            elif os.path.exists(tensors_path_for(path)):
                os.remove(tensors_path_for(path))
            _replace_directory(staged, path)
            report.path = path
            if manifest:
                os.replace(os.path.join(staging, os.path.basename(manifest_path_for(path))), manifest_path_for(path))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        model.train(was_training)
    return CoreMLExport(
        path=path,
        manifest_path=manifest_path_for(path) if manifest else None,
        tensors_path=tensors_path_for(path) if tensors else None,
        target=target.name,
        spec_version=report.spec_version,
        modules=len(modules),
        op_counts=report.op_counts,
        weight_bin_bytes=report.weight_bin_bytes,
        package_bytes=_package_bytes(path),
        verification=report,
    )


def _replace_directory(source: str, target: str) -> None:
    if not os.path.exists(target):
        os.replace(source, target)
        return
    retired = target + f".old-{os.getpid()}"
    os.replace(target, retired)
    try:
        os.replace(source, target)
    except BaseException:
        os.replace(retired, target)
        raise
    shutil.rmtree(retired, ignore_errors=True)
