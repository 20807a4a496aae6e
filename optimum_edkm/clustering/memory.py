"""Measure what autograd keeps for backward, by looking at every tensor it saves."""

from __future__ import annotations

from typing import Iterable

import torch


class SavedTensorMeter:
    """Context manager: bytes of the distinct storages saved for backward by the code run inside it.

    ``resident`` lists tensors that live anyway (parameters, inputs); a saved tensor sharing their storage
    costs nothing extra and is counted in ``resident_bytes`` instead of ``saved_bytes``. Storages are
    counted once, however many views of them are saved.
    """

    def __init__(self, resident: Iterable[torch.Tensor] = ()):
        self._resident = {self._key(t) for t in resident}
        self._seen = {}
        self.saved_bytes = 0
        self.resident_bytes = 0
        self.saved_tensors = 0
        self._hooks = None

    @staticmethod
    def _key(tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        return (tensor.device.type, tensor.device.index, storage.data_ptr())

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.saved_tensors += 1
        key = self._key(tensor)
        if key not in self._seen:
            nbytes = tensor.untyped_storage().nbytes()
            self._seen[key] = nbytes
            if key in self._resident:
                self.resident_bytes += nbytes
            else:
                self.saved_bytes += nbytes
        return tensor

    def __enter__(self) -> "SavedTensorMeter":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self._hooks = None
