"""View-chain replay: walking back a few view-like autograd nodes from a saved copy to a tensor that is
already held, and re-applying those operations on unpack (the paper's "look a few hops up the graph")."""

from __future__ import annotations

from typing import Tuple

import torch

# ------------------------------------------------------------------------------------- view-chain replaying
_RESHAPES = {
    "ViewBackward0",
    "UnsafeViewBackward0",
    "ReshapeAliasBackward0",
    "_ReshapeAliasBackward0",
    "SqueezeBackward0",
    "SqueezeBackward1",
    "SqueezeBackward2",
    "SqueezeBackward3",
}
_COPIES = {"CloneBackward0"}


def _signed(value: int) -> int:
    # some nodes report negative dims as unsigned 64-bit integers
    return value - (1 << 64) if value >= (1 << 63) else value


def _sizes(values) -> Tuple[int, ...]:
    return tuple(int(v) for v in values)


def step_back(node, output_nr: int, size_out: Tuple[int, ...]):
    """``(op, size_in)`` for one view-like node whose output has ``size_out``; ``None`` if unsupported."""
    name = node.name()
    if name == "SplitBackward0":
        return ("split", int(node._saved_split_size), _signed(node._saved_dim), output_nr), _sizes(
            node._saved_self_sym_sizes
        )
    if name == "SplitWithSizesBackward0":
        return ("split", _sizes(node._saved_split_sizes), _signed(node._saved_dim), output_nr), _sizes(
            node._saved_self_sym_sizes
        )
    if output_nr != 0:
        return None
    if name in _RESHAPES:
        return ("reshape", size_out), _sizes(node._saved_self_sym_sizes)
    if name == "ExpandBackward0":
        return ("expand", size_out), _sizes(node._saved_self_sym_sizes)
    if name in _COPIES or name == "AliasBackward0":
        return (("clone",) if name in _COPIES else ("alias",)), size_out
    if name == "TBackward0":
        return ("t",), size_out[::-1]
    if name == "TransposeBackward0":
        rank = len(size_out)
        d0, d1 = _signed(node._saved_dim0) % rank, _signed(node._saved_dim1) % rank
        size_in = list(size_out)
        size_in[d0], size_in[d1] = size_in[d1], size_in[d0]
        return ("transpose", d0, d1), tuple(size_in)
    if name == "PermuteBackward0":
        rank = len(size_out)
        dims = tuple(_signed(d) % rank for d in node._saved_dims)
        size_in = [0] * rank
        for position, dim in enumerate(dims):
            size_in[dim] = size_out[position]
        return ("permute", dims), tuple(size_in)
    if name == "UnsqueezeBackward0":
        dim = _signed(node._saved_dim) % len(size_out)
        return ("unsqueeze", dim), size_out[:dim] + size_out[dim + 1 :]
    if name == "SliceBackward0":
        return (
            "slice",
            _signed(node._saved_dim),
            _signed(node._saved_start),
            _signed(node._saved_end),
            int(node._saved_step),
        ), _sizes(node._saved_self_sym_sizes)
    if name == "SelectBackward0":
        return ("select", _signed(node._saved_dim), _signed(node._saved_index)), _sizes(node._saved_self_sym_sizes)
    if name == "DiagonalBackward0":
        return ("diagonal", _signed(node._saved_offset), _signed(node._saved_dim1), _signed(node._saved_dim2)), _sizes(
            node._saved_self_sym_sizes
        )
    if name == "UnfoldBackward0":
        return ("unfold", _signed(node._saved_dimension), int(node._saved_size), int(node._saved_step)), _sizes(
            node._saved_self_sym_sizes
        )
    return None


def apply_op(op, x: torch.Tensor) -> torch.Tensor:
    kind = op[0]
    if kind == "reshape":
        return x.reshape(op[1])
    if kind == "expand":
        return x.expand(op[1])
    if kind == "clone":
        return x.clone()
    if kind == "alias":
        return x
    if kind == "t":
        return x.t()
    if kind == "transpose":
        return x.transpose(op[1], op[2])
    if kind == "permute":
        return x.permute(op[1])
    if kind == "unsqueeze":
        return x.unsqueeze(op[1])
    if kind == "slice":
        return torch.ops.aten.slice.Tensor(x, op[1], op[2], op[3], op[4])
    if kind == "select":
        return x.select(op[1], op[2])
    if kind == "split":
        return torch.split(x, list(op[1]) if isinstance(op[1], tuple) else op[1], op[2])[op[3]]
    if kind == "diagonal":
        return x.diagonal(op[1], op[2], op[3])
    if kind == "unfold":
        return x.unfold(op[1], op[2], op[3])
    raise AssertionError(f"unknown replay op {kind}")


def replay(x: torch.Tensor, ops) -> torch.Tensor:
    with torch.no_grad():
        for op in ops:
            x = apply_op(op, x)
    return x
