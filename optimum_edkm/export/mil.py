"""An independent reader of saved ML programs: the op graph from ``model.mlmodel`` and the tensors from
``weights/weight.bin``, decoded with numpy (not with coremltools' own loader, so that the two can be compared).

Formats (see docs/export.md):

* ``weight.bin`` is MILBlob storage v2: a 64-byte header ``{uint32 count; uint32 version=2; ...}``, then for
  each tensor a 64-byte record ``{uint32 sentinel=0xDEADBEEF; uint32 dtype; uint64 size; uint64 offset; ...}``
  and its data, both 64-byte aligned. A ``blobFileValue.offset`` points at the record, not at the data.
* Sub-byte tensors (``uint1`` ... ``uint6``) are a row-major bit stream filled LSB-first: element ``i``
  occupies bits ``[i*n, (i+1)*n)``, bit ``b`` being bit ``b % 8`` of byte ``b // 8``.

Only the protobuf classes of coremltools are used here (to parse ``model.mlmodel``).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

STORAGE_HEADER = struct.Struct("<II")
BLOB_RECORD = struct.Struct("<IIQQ")
BLOB_SENTINEL = 0xDEADBEEF
STORAGE_VERSION = 2

# MIL proto DataType enum -> (numpy dtype of the decoded values, bits per element when packed below a byte)
MIL_DTYPES = {
    1: (np.bool_, None),
    10: (np.float16, None),
    11: (np.float32, None),
    12: (np.float64, None),
    21: (np.int8, None),
    22: (np.int16, None),
    23: (np.int32, None),
    24: (np.int64, None),
    31: (np.uint8, None),
    32: (np.uint16, None),
    33: (np.uint32, None),
    34: (np.uint64, None),
    37: (np.uint8, 1),
    36: (np.uint8, 2),
    39: (np.uint8, 3),
    35: (np.uint8, 4),
    38: (np.uint8, 6),
}
MIL_DTYPE_NAMES = {
    1: "bool",
    10: "fp16",
    11: "fp32",
    12: "fp64",
    21: "int8",
    22: "int16",
    23: "int32",
    24: "int64",
    31: "uint8",
    32: "uint16",
    33: "uint32",
    34: "uint64",
    37: "uint1",
    36: "uint2",
    39: "uint3",
    35: "uint4",
    38: "uint6",
}
#: index dtypes of the iOS18 ``constexpr_lut_to_dense`` op -> bits per index
INDEX_BITS = {37: 1, 36: 2, 39: 3, 35: 4, 38: 6, 31: 8}
# MILBlob BlobDataType of the record -> the MIL proto DataType it must describe
BLOB_DTYPES = {1: 10, 2: 11, 3: 31, 4: 21, 6: 22, 7: 32, 9: 37, 10: 36, 11: 35, 12: 39, 13: 38, 14: 23, 15: 33}


class PackageFormatError(ValueError):
    """The package is not a well-formed ML program package."""


def unpack_bits(raw: np.ndarray, bits: int, count: int) -> np.ndarray:
    """``count`` unsigned ``bits``-bit integers from an LSB-first bit stream (uint8 array)."""
    if raw.size * 8 < count * bits:
        raise PackageFormatError(f"{raw.size} bytes cannot hold {count} values of {bits} bits")
    stream = np.unpackbits(raw, bitorder="little")[: count * bits].reshape(count, bits)
    weights = (1 << np.arange(bits, dtype=np.uint16)).astype(np.uint16)
    return (stream.astype(np.uint16) * weights).sum(axis=1).astype(np.uint8)


def tensor_shape(value_type) -> tuple:
    tensor_type = value_type.tensorType
    return tuple(int(d.constant.size) for d in tensor_type.dimensions)


@dataclass
class BlobRecord:
    offset: int  # of the 64-byte record in weight.bin
    blob_dtype: int
    size: int  # bytes of data
    data_offset: int


@dataclass
class Tensor:
    """A decoded tensor and where it came from."""

    array: np.ndarray
    mil_dtype: int
    blob: Optional[BlobRecord] = None

    @property
    def dtype_name(self) -> str:
        return MIL_DTYPE_NAMES.get(self.mil_dtype, str(self.mil_dtype))

    @property
    def stored_bytes(self) -> int:
        return self.blob.size if self.blob is not None else 0


class BlobFile:
    """``weight.bin`` read once; records checked for the sentinel, the dtype and the bounds."""

    def __init__(self, path: str):
        with open(path, "rb") as handle:
            self.data = handle.read()
        self.path = path
        if len(self.data) < 64:
            raise PackageFormatError(f"{path}: {len(self.data)} bytes is shorter than the 64-byte storage header")
        self.count, self.version = STORAGE_HEADER.unpack_from(self.data, 0)
        if self.version != STORAGE_VERSION:
            raise PackageFormatError(f"{path}: MILBlob storage version {self.version}, expected {STORAGE_VERSION}")

    def record(self, offset: int) -> BlobRecord:
        if offset % 64 or offset + BLOB_RECORD.size > len(self.data):
            raise PackageFormatError(f"{self.path}: blob record offset {offset} is unaligned or out of the file")
        sentinel, blob_dtype, size, data_offset = BLOB_RECORD.unpack_from(self.data, offset)
        if sentinel != BLOB_SENTINEL:
            raise PackageFormatError(f"{self.path}: no blob record at offset {offset} (sentinel {sentinel:#x})")
        if data_offset % 64 or data_offset + size > len(self.data):
            raise PackageFormatError(f"{self.path}: blob at {offset} points outside the file")
        return BlobRecord(offset, blob_dtype, size, data_offset)

    def raw(self, record: BlobRecord) -> np.ndarray:
        return np.frombuffer(self.data, dtype=np.uint8, count=record.size, offset=record.data_offset)


@dataclass
class MilOp:
    type: str
    name: str  # name of the (first) output
    output_dtype: int
    output_shape: tuple
    inputs: dict = field(default_factory=dict)  # param -> list of Argument.Binding
    attributes: dict = field(default_factory=dict)  # key -> Value
    has_output: bool = True

    def argument_names(self, param: str) -> list:
        """Names of the values bound to ``param`` (inline values are left out)."""
        return [a.name for a in self.inputs.get(param, []) if a.WhichOneof("binding") == "name"]


@dataclass
class FunctionInput:
    """An input of the ML program's function: a tensor or a state (``shape`` has ``None`` for a flexible size)."""

    name: str
    kind: str  # "tensor" or "state"
    dtype: str
    shape: tuple


class MilPackage:
    """An ``.mlpackage`` read from disk: spec, ops of ``main``, and tensor decoding."""

    def __init__(self, path: str):
        from coremltools.proto import Model_pb2

        self.path = path
        self.model_path = self._model_file(path)
        spec = Model_pb2.Model()
        with open(self.model_path, "rb") as handle:
            spec.ParseFromString(handle.read())
        self.spec = spec
        if spec.WhichOneof("Type") != "mlProgram":
            raise PackageFormatError(f"{path} holds a {spec.WhichOneof('Type')!r} model, not an ML program")
        functions = spec.mlProgram.functions
        if "main" not in functions:
            raise PackageFormatError(f"{path}: the ML program has no 'main' function")
        main = functions["main"]
        self.opset = main.opset
        self.model_dir = os.path.dirname(self.model_path)
        self.ops = [self._op(op) for op in main.block_specializations[main.opset].operations]
        self.by_output = {op.name: op for op in self.ops if op.has_output}
        self.inputs = {value.name: self._function_input(value) for value in main.inputs}
        self.consumers = {}
        for op in self.ops:
            for param, arguments in op.inputs.items():
                for argument in arguments:
                    if argument.WhichOneof("binding") == "name":
                        self.consumers.setdefault(argument.name, []).append((op, param))
        self._blob_files = {}
        self._cache = {}

    # ------------------------------------------------------------------------------------------- files
    @staticmethod
    def _model_file(path: str) -> str:
        manifest_path = os.path.join(path, "Manifest.json")
        if not os.path.isfile(manifest_path):
            raise PackageFormatError(f"{path} is not an .mlpackage (no Manifest.json)")
        with open(manifest_path) as handle:
            manifest = json.load(handle)
        entry = manifest.get("itemInfoEntries", {}).get(manifest.get("rootModelIdentifier"))
        if not entry or "path" not in entry:
            raise PackageFormatError(f"{manifest_path} names no root model")
        model_path = os.path.join(path, "Data", entry["path"])
        if not os.path.isfile(model_path):
            raise PackageFormatError(f"{path}: the root model {entry['path']} is missing")
        return model_path

    @property
    def spec_version(self) -> int:
        return int(self.spec.specificationVersion)

    def weight_files(self) -> dict:
        """``{relative path: bytes}`` of every blob file the program references."""
        names = set()
        for op in self.ops:
            for value in self._values(op):
                if value.HasField("blobFileValue"):
                    names.add(value.blobFileValue.fileName)
        return {name: os.path.getsize(self._blob_path(name)) for name in sorted(names)}

    def blob_count(self) -> int:
        return sum(self._blob_file(name).count for name in self.weight_files())

    def _blob_path(self, file_name: str) -> str:
        if not file_name.startswith("@model_path/"):
            raise PackageFormatError(f"blob file {file_name!r} is not inside the package")
        return os.path.join(self.model_dir, file_name[len("@model_path/") :])

    def _blob_file(self, file_name: str) -> BlobFile:
        if file_name not in self._blob_files:
            self._blob_files[file_name] = BlobFile(self._blob_path(file_name))
        return self._blob_files[file_name]

    # -------------------------------------------------------------------------------------------- ops
    @staticmethod
    def _op(op) -> MilOp:
        inputs = {k: list(v.arguments) for k, v in op.inputs.items()}
        attributes = {k: v for k, v in op.attributes.items() if k != "name"}
        if not op.outputs:  # write_state: named by its "name" attribute, produces nothing
            label = op.attributes["name"].immediateValue.tensor.strings.values[0] if "name" in op.attributes else ""
            return MilOp(
                type=op.type,
                name=label,
                output_dtype=0,
                output_shape=(),
                inputs=inputs,
                attributes=attributes,
                has_output=False,
            )
        output = op.outputs[0]
        return MilOp(
            type=op.type,
            name=output.name,
            output_dtype=output.type.tensorType.dataType,
            output_shape=tensor_shape(output.type),
            inputs=inputs,
            attributes=attributes,
        )

    @staticmethod
    def _function_input(value) -> FunctionInput:
        kind = "state" if value.type.WhichOneof("type") == "stateType" else "tensor"
        tensor_type = value.type.stateType.wrappedType.tensorType if kind == "state" else value.type.tensorType
        shape = tuple(
            int(d.constant.size) if d.WhichOneof("dimension") == "constant" else None for d in tensor_type.dimensions
        )
        return FunctionInput(
            value.name, kind, MIL_DTYPE_NAMES.get(tensor_type.dataType, str(tensor_type.dataType)), shape
        )

    @staticmethod
    def _values(op: MilOp):
        for arguments in op.inputs.values():
            for argument in arguments:
                if argument.WhichOneof("binding") == "value":
                    yield argument.value
        yield from op.attributes.values()

    def has_param(self, op: MilOp, param: str) -> bool:
        return param in op.inputs or param in op.attributes

    def producer(self, op: MilOp, param: str) -> Optional[MilOp]:
        """The op whose output feeds ``param`` of ``op`` (``None`` for inline values)."""
        for argument in op.inputs.get(param, []):
            if argument.WhichOneof("binding") == "name":
                return self.by_output.get(argument.name)
        return None

    def param(self, op: MilOp, param: str) -> Tensor:
        """The value of ``param`` of ``op``: an inline value, an attribute (iOS16 constexpr ops) or the
        evaluated output of another constant op."""
        if param in op.attributes:
            return self.value(op.attributes[param])
        arguments = op.inputs.get(param)
        if not arguments:
            raise PackageFormatError(f"op {op.name!r} ({op.type}) has no parameter {param!r}")
        argument = arguments[0]
        if argument.WhichOneof("binding") == "value":
            return self.value(argument.value)
        return self.evaluate(argument.name)

    # ----------------------------------------------------------------------------------------- values
    def value(self, value) -> Tensor:
        mil_dtype = value.type.tensorType.dataType
        if mil_dtype not in MIL_DTYPES:
            raise PackageFormatError(f"unsupported MIL dtype {mil_dtype}")
        np_dtype, bits = MIL_DTYPES[mil_dtype]
        shape = tensor_shape(value.type)
        count = int(np.prod(shape)) if shape else 1
        if value.HasField("blobFileValue"):
            blob_file = self._blob_file(value.blobFileValue.fileName)
            record = blob_file.record(int(value.blobFileValue.offset))
            if BLOB_DTYPES.get(record.blob_dtype) != mil_dtype:
                raise PackageFormatError(
                    f"blob at {record.offset} has storage dtype {record.blob_dtype} but the program declares "
                    f"{MIL_DTYPE_NAMES.get(mil_dtype, mil_dtype)}"
                )
            raw = blob_file.raw(record)
            expected = math.ceil(count * (bits or 8 * np.dtype(np_dtype).itemsize) / 8)
            if record.size != expected:
                raise PackageFormatError(
                    f"blob at {record.offset} holds {record.size} bytes; {count} "
                    f"{MIL_DTYPE_NAMES[mil_dtype]} values need {expected}"
                )
            array = unpack_bits(raw, bits, count) if bits else raw.view(np_dtype)[:count]
            return Tensor(array.reshape(shape), mil_dtype, record)
        if not value.HasField("immediateValue"):
            raise PackageFormatError("a value is neither inline nor in a blob file")
        tensor = value.immediateValue.tensor
        kind = tensor.WhichOneof("value")
        if kind == "bytes":
            raw = np.frombuffer(tensor.bytes.values, dtype=np.uint8)
            array = unpack_bits(raw, bits, count) if bits else raw.view(np_dtype)[:count]
        elif kind in ("floats", "ints", "longInts", "doubles", "bools"):
            array = np.asarray(list(getattr(tensor, kind).values), dtype=np_dtype)
        else:
            raise PackageFormatError(f"unsupported inline tensor kind {kind!r}")
        if array.size != count:
            raise PackageFormatError(f"inline value holds {array.size} elements, its type says {count}")
        return Tensor(array.reshape(shape), mil_dtype)

    def evaluate(self, name: str) -> Tensor:
        """The value of a constant op's output (``const`` and the constexpr decompression ops)."""
        if name in self._cache:
            return self._cache[name]
        op = self.by_output.get(name)
        if op is None:
            raise PackageFormatError(f"no op produces {name!r}")
        if op.type == "const":
            result = self.param(op, "val")
        elif op.type == "constexpr_lut_to_dense":
            result = Tensor(self._lut_to_dense(op), op.output_dtype)
        elif op.type == "constexpr_blockwise_shift_scale":
            result = Tensor(self._shift_scale(op), op.output_dtype)
        else:
            raise PackageFormatError(f"{name!r} is produced by {op.type}, not by a constant op")
        if result.array.shape != op.output_shape and op.output_shape:
            raise PackageFormatError(f"{name!r} decodes to shape {result.array.shape}, declared {op.output_shape}")
        self._cache[name] = result
        return result

    def _lut_to_dense(self, op: MilOp) -> np.ndarray:
        indices, lut = self.param(op, "indices"), self.param(op, "lut")
        if self.has_param(op, "shape"):  # iOS16/17: flat packed bytes, 1-D LUT
            shape = tuple(int(s) for s in self.param(op, "shape").array.reshape(-1))
            entries = lut.array.reshape(-1)
            bits = int(math.log2(entries.size))
            if 2**bits != entries.size:
                raise PackageFormatError(f"{op.name}: a LUT of {entries.size} entries")
            count = int(np.prod(shape))
            flat = unpack_bits(indices.array.reshape(-1).astype(np.uint8), bits, count)
            return entries[flat.astype(np.intp)].reshape(shape)
        table = lut.array
        idx = indices.array.astype(np.intp)
        if table.ndim != idx.ndim + 2 or table.shape[-1] != 1:
            raise PackageFormatError(
                f"{op.name}: LUT shape {table.shape} for indices {idx.shape} (vector "
                f"palettization is not produced by optimum-edkm)"
            )
        bits = INDEX_BITS.get(indices.mil_dtype)
        if bits is None or table.shape[-2] != 2**bits:
            raise PackageFormatError(f"{op.name}: {indices.dtype_name} indices with a {table.shape[-2]}-entry LUT")
        block = []
        for axis, (size, tables) in enumerate(zip(idx.shape, table.shape[:-2])):
            if size % tables:
                raise PackageFormatError(
                    f"{op.name}: axis {axis} of size {size} is not divisible into {tables} LUT blocks"
                )
            shape = [1] * idx.ndim
            shape[axis] = size
            block.append((np.arange(size) // (size // tables)).reshape(shape))
        return table[(*block, idx, 0)]

    def _shift_scale(self, op: MilOp) -> np.ndarray:
        data, scale = self.param(op, "data"), self.param(op, "scale")
        offset = self.param(op, "offset") if self.has_param(op, "offset") else None
        values = data.array.astype(np.float32)
        if offset is not None:
            values = values - self._expand(offset.array, values.shape, op).astype(np.float32)
        values = values * self._expand(scale.array, values.shape, op).astype(np.float32)
        # fp16 x fp16 is exact in fp32, so this single rounding is the correctly rounded fp16 product
        return values.astype(MIL_DTYPES[op.output_dtype][0])

    @staticmethod
    def _expand(array: np.ndarray, shape: tuple, op: MilOp) -> np.ndarray:
        if array.ndim != len(shape):
            raise PackageFormatError(f"{op.name}: scale/offset rank {array.ndim} != data rank {len(shape)}")
        for axis, (size, blocks) in enumerate(zip(shape, array.shape)):
            if size % blocks:
                raise PackageFormatError(f"{op.name}: axis {axis} of size {size} is not divisible into {blocks}")
            array = np.repeat(array, size // blocks, axis=axis)
        return array

    # ------------------------------------------------------------------------------------------ queries
    def op_counts(self) -> dict:
        counts = {}
        for op in self.ops:
            counts[op.type] = counts.get(op.type, 0) + 1
        return dict(sorted(counts.items()))

    def user_metadata(self) -> dict:
        return dict(self.spec.description.metadata.userDefined)
