"""Device meshes, the logical-axis rules that place weights, caches and activations on them, and multi-host start-up."""

from sharding.distributed import DistributedError, initialize, is_lead
from sharding.heads import HeadLayout, head_layout
from sharding.mesh import DATA, MODEL, MeshError, make_mesh
from sharding.rules import RULES, Placement, logical_to_spec, named_sharding

__all__ = [
    "DATA",
    "MODEL",
    "RULES",
    "DistributedError",
    "HeadLayout",
    "MeshError",
    "Placement",
    "head_layout",
    "initialize",
    "is_lead",
    "logical_to_spec",
    "make_mesh",
    "named_sharding",
]
