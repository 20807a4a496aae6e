"""Marshaling the clustering of a model's train-time modules: a training-time option, never a checkpoint field.

``with saved_tensor_policy(model, offload=True, shard=False): trainer.train()`` - like
``torch.autograd.graph.save_on_cpu`` - wraps every clustered module's clustering in one shared
:class:`~.hooks.TensorMarshal` while the block runs (``EDKMTrainingArguments(offload_saved_tensors=...,
shard_saved_tensors=...)`` does the same for ``EDKMTrainer.train``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional, Union

from .hooks import TensorMarshal
from .policy import MarshalPolicy


class ClusteringMarshal:
    """Runs a module's clustering inside one shared :class:`TensorMarshal`, so that what the clustering saves
    for backward is offloaded / sharded as asked."""

    def __init__(self, marshal: TensorMarshal):
        self.marshal = marshal

    def __call__(self, clustering):
        with self.marshal:
            return clustering()

    def counters(self, reset: bool = True) -> dict:
        values = self.marshal.as_dict(prefix="")
        if reset:
            self.marshal.reset()
        return values


def policy_for(
    offload: Union[bool, str, dict, MarshalPolicy, None] = False, shard: bool = False
) -> Optional[MarshalPolicy]:
    """The policy ``offload`` (False, True, a device, a dict of :class:`MarshalPolicy` fields or a policy) and
    ``shard`` ask for, or ``None``. Sharding alone keeps this rank's slice on the compute device."""
    if not isinstance(shard, bool):
        raise ValueError(f"shard must be True or False, got {shard!r}")
    policy = MarshalPolicy.from_config(offload)
    if shard:
        policy = (
            dataclasses.replace(policy, shard=True)
            if policy is not None
            else MarshalPolicy(shard=True, memory_threshold=1.0)
        )
    return policy


def attach(model, policy: Optional[MarshalPolicy]) -> Optional[ClusteringMarshal]:
    """Give every module of ``model`` that runs its clustering through a ``saved_tensor_policy`` attribute (the
    train-time modules of :mod:`optimum_edkm.nn`) one shared marshal for ``policy`` (``None`` removes it)."""
    shared = ClusteringMarshal(TensorMarshal(policy)) if policy is not None else None
    for module in model.modules():
        if hasattr(module, "saved_tensor_policy"):
            module.saved_tensor_policy = shared
    return shared


@contextlib.contextmanager
def saved_tensor_policy(model, offload: Union[bool, str, dict, MarshalPolicy] = True, shard: bool = False):
    """Offload and/or shard what the clustering of ``model`` saves for backward while the block runs; yields
    the :class:`ClusteringMarshal` (its ``counters()`` say what was done) and restores the previous policy."""
    previous = {id(m): m.saved_tensor_policy for m in model.modules() if hasattr(m, "saved_tensor_policy")}
    shared = attach(model, policy_for(offload, shard))
    try:
        yield shared
    finally:
        for module in model.modules():
            if id(module) in previous:
                module.saved_tensor_policy = previous[id(module)]
