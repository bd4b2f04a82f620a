"""Where one checkpoint tensor goes in a model's parameters (the values of `hf_param_map`)."""

from collections.abc import Callable
from typing import NamedTuple


class HFTensor(NamedTuple):
    """The parameter at `path` receives `to_ours(tensor)` (HF's layout -> ours).

    A tensor that fills only a part of a fused parameter (q of `qkv`, gate of `gate_up`)
    names the `axis` and the `part` (a slice along it) it fills; the parameter is complete
    once every part has arrived.
    """

    path: tuple
    to_ours: Callable
    axis: int | None = None
    part: slice | None = None
