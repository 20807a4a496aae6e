"""Export a palettized model to a Core ML ``.mlpackage`` whose clustered weights are ``constexpr_lut_to_dense``
ops (n-bit indices + our own LUTs), plus a framework-neutral manifest and the palettized tensors beside it.

Two interfaces: :func:`to_coreml` scores a fixed window of tokens (no cache); :func:`to_coreml_generate` is the
stateful generation step (KV cache as Core ML states, prefill and decode through one function with flexible
shapes).

How: every palettized module of a structural copy of the model becomes a float ``nn.Linear`` /
``nn.Embedding`` holding its decoded weight and carrying coremltools' compression-info buffers
(``_COREML_/weight/lut``, ``.../palettization_scale``); ``ct.convert`` then emits LUT ops with our LUTs. The
converter recomputes the indices as the *nearest* LUT entry, so exactness is proven twice: before conversion
every handed-over weight must lie exactly on its LUT entry, and after conversion the saved package is decoded
independently and compared bit for bit with the torch modules (:func:`optimum_edkm.export.verify_coreml`).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from .. import atomic
from ..version import __version__
from . import common
from .checks import (
    check_exportable,
    check_generation_request,
    check_not_there,
    check_toolchain,
    check_wrapper,
)
from .common import directory_bytes, export_copy, float_dtype, manifest_path_for, reference_input_ids, tensors_path_for
from .errors import import_coremltools
from .stateful import StatefulCausalLM, cache_geometry, check_greedy_tokens, reset_cache, torch_step
from .targets import DeploymentTarget, resolve_target

#: fewest new tokens checked against ``model.generate`` before a generation export is converted
GENERATION_CHECK_TOKENS = 8


class FixedLengthLogits(nn.Module):
    """Logits for one window of ``seq_len`` tokens, without KV cache.

    The causal mask (additive, 4-D) and the position ids are constants of the graph: transformers 5 derives
    them from a missing mask with ``torch.diff`` / ``new_ones``, which coremltools 9.0 cannot convert. A model with
    a sliding window shorter than the window gets its sliding-window mask too: as the only mask when every layer
    slides (Mistral), by layer type (``{"full_attention": ..., "sliding_attention": ...}``, which transformers'
    models with ``config.layer_types`` accept) when they mix (Gemma 2/3, Qwen2).
    """

    def __init__(self, model: nn.Module, seq_len: int):
        super().__init__()
        setattr(self, common.WRAPPER_ATTRIBUTE, model)
        dtype = float_dtype(model)
        rows, columns = torch.arange(seq_len)[:, None], torch.arange(seq_len)[None]
        config = getattr(model, "config", None)
        window = getattr(config, "sliding_window", None)
        self.layer_types = set(getattr(config, "layer_types", None) or ())
        self.slides = isinstance(window, int) and window < seq_len and self.layer_types != {"full_attention"}
        for name, blocked in (
            ("mask", columns > rows),
            ("sliding_mask", (columns > rows) | (rows - columns >= (window or 0))),
        ):
            additive = torch.zeros(seq_len, seq_len).masked_fill(blocked, float("-inf"))
            self.register_buffer(name, additive[None, None].to(dtype))
        self.register_buffer("position_ids", torch.arange(seq_len)[None])

    def attention_mask(self):
        if not self.slides:
            return self.mask
        if "sliding_attention" in self.layer_types:
            return {"full_attention": self.mask, "sliding_attention": self.sliding_mask}
        return self.sliding_mask

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        model = getattr(self, common.WRAPPER_ATTRIBUTE)
        return model(
            input_ids=input_ids,
            attention_mask=self.attention_mask(),
            position_ids=self.position_ids,
            use_cache=False,
            return_dict=False,
        )[0]


# --------------------------------------------------------------------------------------------- export
@dataclass
class CoreMLExport:
    """What :func:`to_coreml` / :func:`to_coreml_generate` wrote."""

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
    greedy_tokens: Optional[list] = None  # generation export: the tokens checked against model.generate


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


def _capture(wrapper: nn.Module, example: tuple, capture: str, ct):
    if capture == "trace":
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return torch.jit.trace(wrapper, example, strict=False)
    _register_alias_op(ct)
    return torch.export.export(wrapper, example, strict=False).run_decompositions({})


def _metadata(model, records: dict, target: DeploymentTarget, capture: str, **interface) -> dict:

    quantization = model.config.quantization_config
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    return {
        "version": __version__,
        "quantization_config": json.dumps(quantization.to_dict(), sort_keys=True),
        "model_config": json.dumps(config, sort_keys=True, default=str),
        "minimum_deployment_target": target.name,
        "capture": capture,
        "palettized_modules": str(len(records)),
        **{key: str(value) for key, value in interface.items()},
    }


@dataclass
class _Job:
    """One export: the package path, the model and its palettized modules, and what to write and check."""

    path: str
    model: nn.Module
    records: dict
    target: DeploymentTarget
    capture: str
    manifest: bool
    tensors: bool
    check_logits: bool


def _convert(ct, source, job: _Job, inputs: list, outputs: list, states, descriptions: tuple, **interface):
    """Convert the captured graph to an fp16 ML program for the job's target and describe it: metadata,
    author, version, and ``descriptions``: the model's (a sentence) and its inputs' and outputs' (``{name:
    text}`` each)."""
    mlmodel = ct.convert(
        source,
        inputs=inputs,
        outputs=outputs,
        **({} if states is None else {"states": states}),
        convert_to="mlprogram",
        minimum_deployment_target=getattr(ct.target, job.target.name),
        compute_precision=ct.precision.FLOAT16,
    )
    model, records = job.model, job.records
    description, input_texts, output_texts = descriptions
    for key, value in _metadata(model, records, job.target, job.capture, **interface).items():
        mlmodel.user_defined_metadata[common.METADATA_PREFIX + key] = value
    mlmodel.author = f"optimum-edkm {__version__}"
    mlmodel.version = __version__
    mlmodel.short_description = (
        f"{type(model).__name__} with eDKM-palettized weights ({len(records)} LUT-compressed modules); {description}"
    )
    for name, text in input_texts.items():
        mlmodel.input_description[name] = text
    for name, text in output_texts.items():
        mlmodel.output_description[name] = text
    return mlmodel


def _place(mlmodel, job: _Job, interface: dict, **extra) -> CoreMLExport:
    """Verify the package from disk before anything is replaced, then put it in place through the package's
    atomic writes: the tensors file, the package folder (:func:`optimum_edkm.atomic.commit_folder`: the old
    package or the new one at every instant) and the manifest last (a manifest means a complete export; an
    old one is removed first). Returns the export's description (``extra``: more of its fields)."""
    from .manifest import build_manifest, write_tensors
    from .verify import verify_coreml

    path, model, records, target = job.path, job.model, job.records, job.target

    reports = []

    def stage(staging: str) -> None:
        staged = os.path.join(staging, os.path.basename(path))
        mlmodel.save(staged)
        reports.append(
            verify_coreml(
                staged, model, minimum_deployment_target=target.name, manifest=None, check_logits=job.check_logits
            )
        )
        for name in os.listdir(staged):  # the package's own entries become the folder's
            os.replace(os.path.join(staged, name), os.path.join(staging, name))
        os.rmdir(staged)

    atomic.makedirs(os.path.dirname(path))
    if os.path.exists(manifest_path_for(path)):
        os.remove(manifest_path_for(path))
    # everything in a package folder is the package's own: entries the new one does not write are removed
    atomic.commit_folder(path, stage, owns=lambda name: True, last=("Manifest.json",), what="Core ML package")
    report = reports[0]
    if job.tensors:
        write_tensors(model, records, tensors_path_for(path))
    elif os.path.exists(tensors_path_for(path)):
        os.remove(tensors_path_for(path))
    report.path = path
    if job.manifest:
        document = build_manifest(
            model,
            records,
            report,
            package=os.path.basename(path),
            tensors_file=os.path.basename(tensors_path_for(path)) if job.tensors else None,
            target=target,
            capture=job.capture,
            interface=interface,
        )
        atomic.write_json(manifest_path_for(path), document, default=str)
    return CoreMLExport(
        path=path,
        manifest_path=manifest_path_for(path) if job.manifest else None,
        tensors_path=tensors_path_for(path) if job.tensors else None,
        target=target.name,
        spec_version=report.spec_version,
        modules=len(records),
        op_counts=report.op_counts,
        weight_bin_bytes=report.weight_bin_bytes,
        package_bytes=directory_bytes(path),
        verification=report,
        **extra,
    )


def _absolute(path):
    return os.path.abspath(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else path


def to_coreml(
    model,
    path: str,
    *,
    seq_len: int = 64,
    minimum_deployment_target="iOS18",
    batch_size: int = 1,
    capture: str = "trace",
    overwrite: bool = False,
    manifest: bool = True,
    tensors: bool = True,
    check_logits: bool = True,
) -> CoreMLExport:
    """Export a palettized causal LM to ``path`` (an ``.mlpackage``) with LUT-compressed weights, scoring a fixed
    window of tokens (for generation see :func:`to_coreml_generate`).

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
    path = _absolute(path)
    records = check_exportable(model, path, tokens=seq_len, batch_size=batch_size, target=target, capture=capture)
    job = _Job(path, model, records, target, capture, manifest, tensors, check_logits)
    check_not_there(path, overwrite)
    ct = import_coremltools()
    check_toolchain(ct, capture)
    import numpy as np

    was_training = model.training
    model.eval()
    try:
        clone = export_copy(model, records)
        wrapper = FixedLengthLogits(clone, seq_len).eval()
        example = reference_input_ids(model.config.vocab_size, batch_size, seq_len)
        check_wrapper(clone, wrapper, example)
        source = _capture(wrapper, (example,), capture, ct)
        mlmodel = _convert(
            ct,
            source,
            job,
            inputs=[ct.TensorType(name=common.INPUT_NAME, shape=(batch_size, seq_len), dtype=np.int32)],
            outputs=[ct.TensorType(name=common.OUTPUT_NAME)],
            states=None,
            descriptions=(
                f"logits of a fixed {seq_len}-token window, no KV cache",
                {common.INPUT_NAME: f"token ids, int32 [{batch_size}, {seq_len}]"},
                {common.OUTPUT_NAME: "next-token logits for every position (fp16)"},
            ),
            seq_len=seq_len,
            batch_size=batch_size,
        )
        del source, wrapper, clone
        interface = {
            "interface": "fixed_window",
            "inputs": [{"name": common.INPUT_NAME, "dtype": "int32", "shape": [batch_size, seq_len]}],
            "outputs": [
                {
                    "name": common.OUTPUT_NAME,
                    "dtype": "float16",
                    "shape": [batch_size, seq_len, model.config.vocab_size],
                }
            ],
            "kv_cache": False,
        }
        return _place(mlmodel, job, interface)
    finally:
        model.train(was_training)


#: context length of a generation export when none is given (capped by the model's max_position_embeddings)
DEFAULT_CONTEXT_LENGTH = 512


def to_coreml_generate(
    model,
    path: str,
    *,
    context_length: Optional[int] = None,
    minimum_deployment_target="iOS18",
    overwrite: bool = False,
    manifest: bool = True,
    tensors: bool = True,
    check_logits: bool = True,
    check_tokens: int = GENERATION_CHECK_TOKENS,
    prompt_ids=None,
) -> CoreMLExport:
    """Export a palettized causal LM as a stateful Core ML generation step (iOS18 / macOS15 and later).

    The package has one function, ``input_ids`` int32 ``[1, q]`` + ``causal_mask`` fp16 ``[1, 1, q, end]`` ->
    ``logits`` fp16 ``[1, 1, vocab]`` (the last position), with flexible ``1 <= q <= end <= context_length``,
    and two fp16 states, ``key_cache`` and ``value_cache`` ``[layers, 1, kv_heads, context_length, head_dim]``:
    a call appends the keys and values of its ``q`` tokens at positions ``end - q ... end - 1``. The prompt
    (prefill) and then each new token (decode, ``q = 1``) go through it with one ``MLState``
    (:func:`optimum_edkm.export.generate_with_package`, ``examples/coreml_generate.py``). Every palettized
    weight is a LUT op, checked bit for bit as in :func:`to_coreml`.

    Before conversion, the eager torch wrapper and its traced graph (what ``ct.convert`` reads) must generate
    exactly ``model.generate``'s greedy tokens for ``check_tokens`` new tokens after ``prompt_ids`` (default:
    4 fixed pseudo-random tokens).

    Args:
        context_length: the most tokens (prompt + generated) one sequence can hold; sizes the states. Default:
            512, or the model's ``max_position_embeddings`` if smaller.
        minimum_deployment_target, overwrite, manifest, tensors, check_logits: as in :func:`to_coreml`.

    Raises: as :func:`to_coreml`; :class:`CoreMLExportError` also when the target has no states, or when the
        wrapper's greedy tokens differ from ``model.generate`` (an architecture whose attention does not take the
        explicit cache and mask).
    """
    target = resolve_target(minimum_deployment_target)
    path = _absolute(path)
    if context_length is None:
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        context_length = min(DEFAULT_CONTEXT_LENGTH, limit) if isinstance(limit, int) else DEFAULT_CONTEXT_LENGTH
    records = check_exportable(
        model, path, tokens=context_length, batch_size=1, target=target, capture="trace", tokens_label="context_length"
    )
    check_generation_request(model, context_length, target, check_tokens)
    job = _Job(path, model, records, target, "trace", manifest, tensors, check_logits)
    check_not_there(path, overwrite)
    ct = import_coremltools()
    check_toolchain(ct, "trace")
    import numpy as np

    was_training = model.training
    model.eval()
    try:
        geometry = cache_geometry(model)
        clone = export_copy(model, records)
        wrapper = StatefulCausalLM(clone, context_length, geometry=geometry).eval()
        prompt = reference_input_ids(model.config.vocab_size, 1, 4).numpy() if prompt_ids is None else prompt_ids
        # a prefill of 2 tokens after 3 cached ones: no size is 1 or equal to another, so none is baked in
        example = (torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 1, 2, 5, dtype=float_dtype(clone)))
        source = _capture(wrapper, example, "trace", ct)
        steps = {"torch wrapper": torch_step(wrapper), "traced graph that is converted": torch_step(source)}
        tokens = check_greedy_tokens(
            model, steps, prompt, check_tokens, context_length, eos_token_id=getattr(model.config, "eos_token_id", None)
        )
        reset_cache(source)
        query = ct.RangeDim(lower_bound=1, upper_bound=context_length, default=1)
        end = ct.RangeDim(lower_bound=1, upper_bound=context_length, default=1)
        state_shape = geometry.shape(1, context_length)
        mlmodel = _convert(
            ct,
            source,
            job,
            inputs=[
                ct.TensorType(name=common.INPUT_NAME, shape=(1, query), dtype=np.int32),
                ct.TensorType(name=common.MASK_NAME, shape=(1, 1, query, end), dtype=np.float16),
            ],
            outputs=[ct.TensorType(name=common.OUTPUT_NAME, dtype=np.float16)],
            states=[
                ct.StateType(wrapped_type=ct.TensorType(shape=state_shape, dtype=np.float16), name=name)
                for name in (common.KEY_CACHE, common.VALUE_CACHE)
            ],
            descriptions=(
                f"stateful generation step (KV cache of {context_length} tokens as states)",
                {
                    common.INPUT_NAME: f"the new token ids, int32 [1, q], 1 <= q <= {context_length}",
                    common.MASK_NAME: "additive causal mask fp16 [1, 1, q, end]: 0 where new token i (position "
                    "end - q + i) may attend to position j, -inf elsewhere; end = cached + new tokens",
                },
                {common.OUTPUT_NAME: "next-token logits of the last new token (fp16)"},
            ),
            interface="generate",
            context_length=context_length,
        )
        del source, wrapper, clone
        interface = {
            "interface": "generate",
            "inputs": [
                {"name": common.INPUT_NAME, "dtype": "int32", "shape": [1, f"1..{context_length}"]},
                {
                    "name": common.MASK_NAME,
                    "dtype": "float16",
                    "shape": [1, 1, f"1..{context_length}", f"1..{context_length}"],
                },
            ],
            "outputs": [{"name": common.OUTPUT_NAME, "dtype": "float16", "shape": [1, 1, model.config.vocab_size]}],
            "kv_cache": True,
            "states": [
                {
                    "name": name,
                    "dtype": "float16",
                    "shape": list(state_shape),
                    "layout": "[layers, batch, kv_heads, context_length, head_dim]",
                }
                for name in (common.KEY_CACHE, common.VALUE_CACHE)
            ],
            "context_length": context_length,
        }
        return _place(mlmodel, job, interface, greedy_tokens=tokens)
    finally:
        model.train(was_training)
