"""The clustering engine: DKM and eDKM in pure torch (no transformers import).

* :func:`dkm_reference` - plain DKM with the full attention map (oracle and benchmark baseline);
* :func:`edkm_cluster` - eDKM: uniquified forward, exact backward over distinct values;
* :func:`init_centroids`, :func:`hard_assign`, :func:`decode` - k-means initialisation and snapping;
* :func:`pack_indices`, :func:`unpack_indices` - n-bit index packing;
* :class:`ClusteringSpec` - the validated hyper-parameters shared by all of them.
"""

from .edkm import edkm_cluster
from .kmeans import HardAssignment, decode, hard_assign, init_centroids
from .layout import per_channel_scale
from .memory import SavedTensorMeter
from .packing import pack_indices, packed_size, unpack_indices
from .reference import ClusterOutput, dkm_reference
from .spec import ClusteringSpec
from .uniquify import UniqueValues, uniquify

__all__ = [
    "ClusterOutput",
    "ClusteringSpec",
    "HardAssignment",
    "SavedTensorMeter",
    "UniqueValues",
    "decode",
    "dkm_reference",
    "edkm_cluster",
    "hard_assign",
    "init_centroids",
    "pack_indices",
    "packed_size",
    "per_channel_scale",
    "uniquify",
    "unpack_indices",
]
