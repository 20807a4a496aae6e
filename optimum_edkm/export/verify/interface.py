"""What the package says it is and computes: specification version and ``optimum_edkm.*`` metadata against the
model, the fixed-window or generation interface, and the generation package's KV-cache state updates."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

from ...version import __version__
from ..common import INPUT_NAME, KEY_CACHE, MASK_NAME, METADATA_PREFIX, OUTPUT_NAME, VALUE_CACHE
from ..mil import MilPackage
from ..stateful import cache_geometry
from ..targets import SPEC_VERSIONS, resolve_target
from .report import FIXED_WINDOW, GENERATE, Findings

#: the quantization-config fields that decide how the weights are stored (training knobs may differ)
LAYOUT_FIELDS = (
    "quant_method",
    "bits",
    "granularity",
    "group_size",
    "enable_per_channel_scale",
    "embedding_bits",
    "lut_dtype",
    "palettized",
    "modules_to_not_convert",
)


@dataclass
class Interface:
    """What the package's metadata and description say it computes."""

    target: str = ""
    kind: str = FIXED_WINDOW
    input_shape: Optional[tuple] = None  # (batch, tokens) for the logits check; None if unusable
    context_length: Optional[int] = None
    states: dict = field(default_factory=dict)


def check_metadata(package: MilPackage, model, target_name: Optional[str], findings: Findings) -> Interface:
    """Specification version of the target, and the ``optimum_edkm.*`` metadata against the model."""
    metadata = package.user_metadata()
    target_name = target_name or metadata.get(METADATA_PREFIX + "minimum_deployment_target")
    interface = Interface(kind=metadata.get(METADATA_PREFIX + "interface", FIXED_WINDOW))
    if target_name is None:
        findings.fail(
            f"the package has no {METADATA_PREFIX}minimum_deployment_target metadata and no target was "
            f"given: it was not written by optimum_edkm.export.to_coreml"
        )
        return interface
    target = resolve_target(target_name)
    interface.target = target.name
    if package.spec_version != SPEC_VERSIONS[target.name]:
        findings.fail(
            f"specification version {package.spec_version}, expected {SPEC_VERSIONS[target.name]} for {target.name}"
        )
    else:
        findings.ok(f"ML program, specification version {package.spec_version} ({target.name}, opset {package.opset})")

    required = ("version", "quantization_config", "model_config")
    missing = [key for key in required if METADATA_PREFIX + key not in metadata]
    if missing:
        findings.fail(f"metadata lacks {', '.join(METADATA_PREFIX + k for k in missing)}")
        return interface
    stored = json.loads(metadata[METADATA_PREFIX + "quantization_config"])
    expected = model.config.quantization_config.to_dict()
    differ = {
        key: (stored.get(key), expected.get(key)) for key in LAYOUT_FIELDS if stored.get(key) != expected.get(key)
    }
    if differ:
        findings.fail(f"metadata quantization_config differs from the model's (package, model): {differ}")
    else:
        findings.ok(
            f"metadata: quantization config matches, written by optimum-edkm "
            f"{metadata[METADATA_PREFIX + 'version']} (this is {__version__})"
        )
    stored_config = json.loads(metadata[METADATA_PREFIX + "model_config"])
    for key in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "tie_word_embeddings"):
        ours = getattr(model.config, key, None)
        if key in stored_config and stored_config[key] != ours:
            findings.fail(f"metadata model_config.{key}={stored_config[key]!r}, the model has {ours!r}")
    if interface.kind == GENERATE:
        context = metadata.get(METADATA_PREFIX + "context_length", "")
        interface.context_length = int(context) if context.isdigit() else None
    return interface


def _description_shape(feature) -> tuple:
    array = feature.type.multiArrayType
    return tuple(int(s) for s in array.shape)


def _description_ranges(feature) -> list:
    """``[(lower, upper)]`` per dimension of a flexible input (upper -1: unbounded); fixed sizes as (s, s)."""
    array = feature.type.multiArrayType
    if array.WhichOneof("ShapeFlexibility") == "shapeRange":
        return [(int(r.lowerBound), int(r.upperBound)) for r in array.shapeRange.sizeRanges]
    return [(int(s), int(s)) for s in array.shape]


def check_fixed_window_io(package: MilPackage, model, interface: Interface, findings: Findings) -> Interface:
    """``input_ids`` int32 ``[batch, seq]`` -> ``logits [batch, seq, vocab]``; no state."""
    inputs = {i.name: i for i in package.spec.description.input}
    outputs = {o.name: o for o in package.spec.description.output}
    if INPUT_NAME not in inputs or OUTPUT_NAME not in outputs:
        findings.fail(
            f"inputs {sorted(inputs)} / outputs {sorted(outputs)}; expected {INPUT_NAME!r} -> {OUTPUT_NAME!r}"
        )
        return interface
    input_shape = _description_shape(inputs[INPUT_NAME])
    out_shape = _description_shape(outputs[OUTPUT_NAME])
    vocab = model.config.vocab_size
    if len(input_shape) != 2 or out_shape != input_shape + (vocab,) or len(inputs) != 1:
        findings.fail(
            f"inputs {sorted(inputs)}, {INPUT_NAME}{list(input_shape)} -> output {OUTPUT_NAME}"
            f"{list(out_shape)}, expected one input [batch, seq] -> [batch, seq, {vocab}]"
        )
        return interface
    if package.spec.description.state:
        findings.fail(f"a fixed-window package has states {[s.name for s in package.spec.description.state]}")
    interface.input_shape = input_shape
    findings.ok(f"{INPUT_NAME} int32 {list(input_shape)} -> {OUTPUT_NAME} {list(out_shape)}")
    return interface


def check_generation_io(package: MilPackage, model, interface: Interface, findings: Findings) -> Interface:
    """``input_ids`` int32 ``[batch, 1..C]`` and ``causal_mask`` fp16 ``[batch, 1, 1..C, 1..C]`` -> ``logits
    [batch, 1, vocab]``, with the fp16 states ``key_cache`` / ``value_cache`` ``[layers, batch, kv_heads, C,
    head_dim]`` (C = context length)."""
    context = interface.context_length
    if context is None:
        findings.fail(f"a generation package without {METADATA_PREFIX}context_length metadata")
        return interface
    description = package.spec.description
    inputs = {i.name: i for i in description.input}
    outputs = {o.name: o for o in description.output}
    if set(inputs) != {INPUT_NAME, MASK_NAME} or OUTPUT_NAME not in outputs:
        findings.fail(
            f"inputs {sorted(inputs)} / outputs {sorted(outputs)}; expected {INPUT_NAME!r}, {MASK_NAME!r} -> "
            f"{OUTPUT_NAME!r}"
        )
        return interface
    ids_ranges, mask_ranges = _description_ranges(inputs[INPUT_NAME]), _description_ranges(inputs[MASK_NAME])
    batch = ids_ranges[0][0] if ids_ranges else 0
    flexible = (1, context)
    ids_ok = (
        ids_ranges == [(batch, batch), flexible]
        and inputs[INPUT_NAME].type.multiArrayType.dataType == inputs[INPUT_NAME].type.multiArrayType.INT32
    )
    mask_ok = (
        mask_ranges == [(batch, batch), (1, 1), flexible, flexible]
        and inputs[MASK_NAME].type.multiArrayType.dataType == inputs[MASK_NAME].type.multiArrayType.FLOAT16
    )
    out_shape = _description_shape(outputs[OUTPUT_NAME])
    vocab = model.config.vocab_size
    if not (ids_ok and mask_ok and out_shape == (batch, 1, vocab)):
        findings.fail(
            f"{INPUT_NAME} {ids_ranges}, {MASK_NAME} {mask_ranges} -> {OUTPUT_NAME} {list(out_shape)}; "
            f"expected int32 [{batch}, 1..{context}], fp16 [{batch}, 1, 1..{context}, 1..{context}] -> "
            f"[{batch}, 1, {vocab}]"
        )
        return interface
    findings.ok(
        f"{INPUT_NAME} int32 [{batch}, 1..{context}], {MASK_NAME} fp16 [{batch}, 1, 1..{context}, "
        f"1..{context}] -> {OUTPUT_NAME} [{batch}, 1, {vocab}]"
    )

    expected = cache_geometry(model).shape(batch, context)
    states = {}
    for state in description.state:
        array = state.type.stateType.arrayType
        states[state.name] = (tuple(int(s) for s in array.shape), array.dataType == array.FLOAT16)
    function_states = {name: value for name, value in package.inputs.items() if value.kind == "state"}
    good = (
        set(states) == {KEY_CACHE, VALUE_CACHE}
        and all(shape == expected and fp16 for shape, fp16 in states.values())
        and {name: (value.shape, value.dtype) for name, value in function_states.items()}
        == {name: (expected, "fp16") for name in (KEY_CACHE, VALUE_CACHE)}
    )
    interface.states = {name: list(shape) for name, (shape, _) in states.items()}
    if not good:
        findings.fail(
            f"states {states} (program: {function_states}); expected fp16 {KEY_CACHE} and {VALUE_CACHE} of "
            f"shape {list(expected)} [layers, batch, kv_heads, context, head_dim]"
        )
        return interface
    findings.ok(
        f"states {KEY_CACHE}, {VALUE_CACHE}: fp16 {list(expected)} [layers, batch, kv_heads, context, head_dim]"
    )
    interface.input_shape = (batch, min(context, 8))
    return interface


def check_state_updates(package: MilPackage, model, findings: Findings) -> None:
    """Each layer writes its new keys and values into the states once: ``2 * layers`` ``write_state`` ops, half
    on each state, each writing a ``slice_update`` of a value read from that same state."""
    layers = int(model.config.num_hidden_layers)
    writes = [op for op in package.ops if op.type == "write_state"]
    per_state = {KEY_CACHE: 0, VALUE_CACHE: 0}
    wrong = []
    for op in writes:
        state = (op.argument_names("input") or [""])[0]
        data = package.by_output.get((op.argument_names("data") or [""])[0])
        source = package.by_output.get((data.argument_names("x") or [""])[0]) if data is not None else None
        if (
            state not in per_state
            or data is None
            or data.type != "slice_update"
            or source is None
            or source.type != "read_state"
            or source.argument_names("input") != [state]
        ):
            wrong.append(op.name)
            continue
        per_state[state] += 1
    if wrong or per_state != {KEY_CACHE: layers, VALUE_CACHE: layers}:
        findings.fail(
            f"state writes {per_state} for {layers} layers (ops not writing a slice_update of their own "
            f"state: {wrong[:3]}); expected {layers} per state"
        )
    else:
        findings.ok(f"{len(writes)} write_state ops: one slice_update of {KEY_CACHE} and of {VALUE_CACHE} per layer")
