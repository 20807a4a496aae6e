"""The commit record of a saved checkpoint, and the checks every load runs against it.

Saving (through ``save_pretrained``, ours or transformers', and Trainer checkpoints) writes a commit record into
the header metadata of every safetensors file: the quantization config the weights were saved with, the model
class, the converted modules, and the sha256 of every tensor. Loading an eDKM checkpoint (palettized or
train-format) refuses, with an error naming the file, tensor or field:

* pickle (``.bin``) weight files (they cannot carry the record);
* a ``config.json`` whose ``quantization_config`` differs from the record (an edited or mismatched config);
* a model class or module list that differs from the checkpoint's (another architecture);
* missing, mis-shaped or wrongly typed tensors of a converted module, and unexpected ones (``*.weight_scale``
  the config does not call for, ...);
* NaN / Inf in a LUT, scale, centroid table or temperature (they are tiny: always checked);
* a tensor whose bytes do not hash to the recorded sha256 (any flipped byte). Hashing reads every byte of the
  checkpoint once; ``with verify_checksums(False):`` skips it for trusted files (the other checks still run).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import mmap
import os
import struct
import threading
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from .nn import CHECKPOINT_WEIGHT_DIM, is_clustered, is_palettized
from .version import __version__

logger = logging.getLogger(__name__)

RECORD_FORMAT = "optimum-edkm-commit/1"
KEY_FORMAT = "edkm_commit"
KEY_CONFIG = "edkm_quantization_config"
KEY_ARCHITECTURE = "edkm_architecture"
KEY_MODULES = "edkm_modules"
KEY_SHA256 = "edkm_sha256"
#: tensors only converted modules have; any of them the model does not expect is refused
STATE_SUFFIXES = ("weight_lut", "weight_scale", "weight_centroids", "weight_temperature")
SAFETENSORS_DTYPES = {
    torch.uint8: "U8",
    torch.float16: "F16",
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int8: "I8",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.bool: "BOOL",
    torch.int16: "I16",
}

_settings = threading.local()


class CheckpointError(ValueError):
    """A checkpoint that does not hold what its config and commit record say (the message names the problem)."""


@contextlib.contextmanager
def verify_checksums(enabled: bool = True):
    """``with verify_checksums(False): AutoModelForCausalLM.from_pretrained(trusted)`` skips hashing every
    tensor (the config, structure and value checks still run)."""
    previous = getattr(_settings, "hash", True)
    _settings.hash = bool(enabled)
    try:
        yield
    finally:
        _settings.hash = previous


def checksums_enabled() -> bool:
    if os.environ.get("OPTIMUM_EDKM_VERIFY_CHECKSUMS", "1").strip().lower() in ("0", "false", "no"):
        return False
    return getattr(_settings, "hash", True)


# ------------------------------------------------------------------------------------------------- saving
def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes as safetensors stores them (contiguous, little-endian)."""
    data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(memoryview(data)).hexdigest()


def converted_modules(model) -> dict:
    """``{module name: role}`` of every clustered / palettized module (and tied head) of ``model``."""
    return {
        name: module.edkm_role
        for name, module in model.named_modules()
        if getattr(module, "edkm_role", None) is not None
    }


def canonical_config(config) -> dict:
    """The quantization config fields the record holds (the package version is informative only)."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    data.pop("edkm_version", None)
    return json.loads(json.dumps(data, sort_keys=True))


def checkpoint_state_dict(model) -> dict:
    """The state dict as an eDKM checkpoint stores it: train-time (clustered) weights get a leading dimension
    of 1, so that transformers without optimum-edkm refuses the file instead of loading a float model."""
    state = model.state_dict()
    for name, module in model.named_modules():
        if is_clustered(module):
            key = f"{name}.weight" if name else "weight"
            if key in state and state[key].dim() == CHECKPOINT_WEIGHT_DIM - 1:
                state[key] = state[key].unsqueeze(0)
    return state


def commit_record(model, config, state_dict: dict) -> dict:
    """The safetensors metadata that records what is being saved (tied duplicates, which transformers does not
    write, are left out)."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state_dict = remove_tied_weights_from_state_dict(dict(state_dict), model)
    return {
        KEY_FORMAT: RECORD_FORMAT,
        KEY_CONFIG: json.dumps(canonical_config(config), sort_keys=True),
        KEY_ARCHITECTURE: type(model).__name__,
        KEY_MODULES: json.dumps(converted_modules(model), sort_keys=True),
        KEY_SHA256: json.dumps({name: tensor_sha256(tensor) for name, tensor in state_dict.items()}, sort_keys=True),
        "edkm_version": __version__,
    }


# ------------------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class StoredTensor:
    file: str
    dtype: str
    shape: tuple
    begin: int  # absolute byte offsets in the file
    end: int


def read_header(path: str) -> tuple[dict, dict]:
    """``(tensors, metadata)`` of a safetensors file, from its header only."""
    try:
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) != 8:
                raise CheckpointError(f"{path} is not a safetensors file (shorter than its 8-byte header size)")
            (length,) = struct.unpack("<Q", prefix)
            size = os.fstat(handle.fileno()).st_size
            if length > size - 8:
                raise CheckpointError(f"{path} is truncated: its header claims {length} bytes, the file has {size}")
            header = json.loads(handle.read(length))
    except (OSError, ValueError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"cannot read the safetensors header of {path}: {error}") from None
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + length
    tensors = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        if start + end > size:
            raise CheckpointError(
                f"{path} is truncated: tensor '{name}' ends at byte {start + end}, the file has {size}"
            )
        tensors[name] = StoredTensor(path, entry["dtype"], tuple(entry["shape"]), start + begin, start + end)
    return tensors, metadata


def _sha256_of_range(path: str, begin: int, end: int, cache: dict) -> str:
    mapped = cache.get(path)
    if mapped is None:
        handle = open(path, "rb")
        mapped = cache[path] = (
            handle,
            mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(handle.fileno()).st_size else b"",
        )
    return hashlib.sha256(memoryview(mapped[1])[begin:end]).hexdigest()


def _read_tensor(stored: StoredTensor, name: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(stored.file, framework="pt") as handle:
        return handle.get_tensor(name)


# ------------------------------------------------------------------------------------------------ verifying
def refuse_pickle_files(checkpoint_files: Iterable[str]) -> list:
    """The safetensors files of the checkpoint; a pickle weight file is refused (it cannot be verified)."""
    files = [str(f) for f in checkpoint_files or []]
    pickled = [f for f in files if not f.endswith(".safetensors")]
    if pickled:
        raise CheckpointError(
            f"{os.path.basename(pickled[0])} is a pickle-format weight file: optimum-edkm loads palettized and "
            f"train-format checkpoints only from safetensors files, whose commit record lets it verify them. "
            f"Re-save the model with optimum_edkm.save_pretrained (safetensors)"
        )
    if not files:
        raise CheckpointError("the checkpoint has no weight file; it is incomplete")
    return files


def expected_tensors(model) -> dict:
    """``{key: (shape, dtype)}`` that the checkpoint must hold for every converted module of ``model`` (in the
    layout it is saved in)."""
    expected = {}
    for name, module in model.named_modules():
        if not (is_palettized(module) or is_clustered(module)):
            continue
        for key, tensor in module.state_dict(keep_vars=True).items():
            shape = tuple(tensor.shape)
            if is_clustered(module) and key == "weight" and len(shape) == CHECKPOINT_WEIGHT_DIM - 1:
                shape = (1,) + shape
            expected[f"{name}.{key}"] = (shape, tensor.dtype)
    return expected


def verify_checkpoint(model, config, checkpoint_files: Iterable[str], *, check_hashes: Optional[bool] = None) -> None:
    """Every check of the module docstring, before any weight is loaded; raises :class:`CheckpointError`."""
    files = refuse_pickle_files(checkpoint_files)
    found, records = {}, []
    for path in files:
        tensors, metadata = read_header(path)
        found.update(tensors)
        records.append((path, metadata))
    expected = expected_tensors(model)
    modules = converted_modules(model)
    record = _check_record(model, config, records, modules)
    _check_structure(model, config, expected, found, modules)
    _check_values(found, expected)
    if record is not None and (checksums_enabled() if check_hashes is None else check_hashes):
        _check_hashes(found, record)


def _owner_module(key: str) -> str:
    return key.rsplit(".", 1)[0] if "." in key else ""


def _check_structure(model, config, expected: dict, found: dict, modules: dict) -> None:
    present_modules = {_owner_module(key) for key in found}
    absent = sorted(name for name in modules if modules[name] != "tied-head" and name not in present_modules)
    if absent:
        raise CheckpointError(
            f"the model ({type(model).__name__}) has {len(absent)} module(s) that the checkpoint does not contain "
            f"(e.g. '{absent[0]}'): the checkpoint was saved from another architecture or another configuration; "
            f"load it with the model class it was saved from (config.json 'architectures')"
        )
    for key, (shape, dtype) in expected.items():
        if key not in found:
            raise CheckpointError(
                f"the checkpoint is missing tensor '{key}' ({len(set(t.file for t in found.values()))} safetensors "
                f"file(s) checked): the file is incomplete or config.json does not match it; re-save the model"
            )
        stored = found[key]
        if stored.shape != shape:
            hint = ""
            module = model.get_submodule(_owner_module(key))
            if key.endswith(".weight") and is_palettized(module):
                out, inn = module.dense_shape
                hint = (
                    f"; {module.bits}-bit indices of a {out}x{inn} weight need {shape[0]} bytes, so the checkpoint "
                    f"does not match config.json's quantization_config (bits={module.bits}, "
                    f"group_size={module.group_size})"
                )
            raise CheckpointError(
                f"tensor '{key}' has shape {stored.shape} in the checkpoint but the model expects {shape}{hint}"
            )
        want = SAFETENSORS_DTYPES.get(dtype)
        if key.rsplit(".", 1)[-1] in ("weight", "bias") and is_clustered(model.get_submodule(_owner_module(key))):
            continue  # float weights load into the model's dtype
        if want is not None and stored.dtype != want:
            raise CheckpointError(
                f"tensor '{key}' is stored as {stored.dtype} but must be {want}; the checkpoint "
                f"is corrupted or was edited"
            )
    unexpected = sorted(key for key in found if key.rsplit(".", 1)[-1] in STATE_SUFFIXES and key not in expected)
    if unexpected:
        raise CheckpointError(
            f"the checkpoint holds tensor '{unexpected[0]}' ({len(unexpected)} unexpected eDKM tensor(s)) that the "
            f"model built from config.json does not have: config.json's quantization_config (e.g. "
            f"enable_per_channel_scale={config.enable_per_channel_scale}, modules_to_not_convert) does not match "
            f"the weights"
        )


def _check_values(found: dict, expected: dict) -> None:
    for key in sorted(expected):
        if key.rsplit(".", 1)[-1] not in STATE_SUFFIXES:
            continue
        values = _read_tensor(found[key], key).float()
        if not bool(torch.isfinite(values).all()):
            raise CheckpointError(
                f"tensor '{key}' holds NaN or infinite values: the checkpoint is corrupted (the "
                f"model would compute NaN); re-save it from a good model"
            )
        if key.endswith(("weight_scale", "weight_temperature")) and not bool((values > 0).all()):
            raise CheckpointError(f"tensor '{key}' holds values <= 0: the checkpoint is corrupted")


def _check_record(model, config, records: list, modules: dict) -> Optional[dict]:
    with_record = [(path, meta) for path, meta in records if meta.get(KEY_FORMAT)]
    if not with_record:
        saved_by = str(getattr(config, "edkm_version", "0.1.0"))
        if saved_by.startswith("0.1."):
            logger.warning(
                "this checkpoint was saved by optimum-edkm %s and has no commit record: its tensors "
                "are checked for shape and values only; re-save it to add the record",
                saved_by,
            )
            return None
        raise CheckpointError(
            f"{os.path.basename(records[0][0])} has no optimum-edkm commit record in its header although "
            f"config.json says it was saved by optimum-edkm {saved_by}: the weight file was rewritten by another "
            f"tool, so it cannot be verified; re-save the model with optimum_edkm.save_pretrained"
        )
    for path, meta in with_record:
        if meta.get(KEY_FORMAT) != RECORD_FORMAT:
            raise CheckpointError(
                f"{os.path.basename(path)} has commit record format {meta.get(KEY_FORMAT)!r}; "
                f"this optimum-edkm reads {RECORD_FORMAT!r}: upgrade optimum-edkm"
            )
    path, meta = with_record[0]
    for other_path, other in with_record[1:]:
        if other.get(KEY_CONFIG) != meta.get(KEY_CONFIG) or other.get(KEY_SHA256) != meta.get(KEY_SHA256):
            raise CheckpointError(
                f"{os.path.basename(path)} and {os.path.basename(other_path)} come from different "
                f"saves (their commit records differ): the checkpoint mixes two models; re-save it"
            )
    try:
        saved_config = json.loads(meta[KEY_CONFIG])
        saved_modules = json.loads(meta.get(KEY_MODULES, "{}"))
        hashes = json.loads(meta[KEY_SHA256])
    except (KeyError, ValueError) as error:
        raise CheckpointError(
            f"the commit record of {os.path.basename(path)} is damaged ({error}); re-save the model"
        ) from None
    current = canonical_config(config)
    # the method's name has two spellings, both this method: 0.2 saved "edkm", 0.3 saves it with the install hint
    differing = sorted(
        k for k in set(saved_config) | set(current) if k != "quant_method" and saved_config.get(k) != current.get(k)
    )
    if differing:
        details = "; ".join(
            f"{k}: saved {saved_config.get(k)!r}, config.json {current.get(k)!r}" for k in differing[:4]
        )
        raise CheckpointError(
            f"config.json's quantization_config differs from the one these weights were saved with ({details}): "
            f"config.json was edited after saving, or it belongs to another save. Restore the saved values (they "
            f"are in the safetensors metadata '{KEY_CONFIG}') or re-save the model"
        )
    if saved_modules and saved_modules != modules:
        only_model = sorted(set(modules) - set(saved_modules))
        only_saved = sorted(set(saved_modules) - set(modules))
        what = (
            f"the model has module(s) the checkpoint does not contain (e.g. '{only_model[0]}')"
            if only_model
            else f"the checkpoint has converted module(s) the model does not (e.g. '{only_saved[0]}')"
            if only_saved
            else "the modules' kinds differ"
        )
        raise CheckpointError(f"{what}: the checkpoint was saved from another architecture or configuration")
    architecture = meta.get(KEY_ARCHITECTURE)
    if architecture and architecture != type(model).__name__:
        raise CheckpointError(
            f"the checkpoint was saved from a {architecture} and is being loaded into a "
            f"{type(model).__name__}: load it with the class it was saved from"
        )
    return hashes


def _check_hashes(found: dict, hashes: dict) -> None:
    cache = {}
    try:
        unmatched_files = {}
        for key, stored in found.items():
            digest = _sha256_of_range(stored.file, stored.begin, stored.end, cache)
            if key in hashes:
                if hashes[key] != digest:
                    raise CheckpointError(
                        f"tensor '{key}' in {os.path.basename(stored.file)} does not match its recorded sha256: the "
                        f"bytes changed after saving (a corrupted or edited file); re-save or re-download the model"
                    )
            else:
                unmatched_files[key] = digest
        unmatched_record = {key: digest for key, digest in hashes.items() if key not in found}
        renamed = set(unmatched_record.values())
        for key, digest in unmatched_files.items():
            # transformers may rename tensors when saving (weight conversions); the bytes must still match
            if digest not in renamed:
                raise CheckpointError(
                    f"tensor '{key}' is not in the checkpoint's commit record: it was added or "
                    f"changed after saving; re-save the model"
                )
        file_digests = set(unmatched_files.values())
        missing = sorted(key for key, digest in unmatched_record.items() if digest not in file_digests)
        if missing:
            raise CheckpointError(
                f"the checkpoint is missing tensor '{missing[0]}' ({len(missing)} recorded at "
                f"saving are absent): a weight file is incomplete or was replaced; re-save the "
                f"model"
            )
    finally:
        for handle, mapped in cache.values():
            if isinstance(mapped, mmap.mmap):
                mapped.close()
            handle.close()
