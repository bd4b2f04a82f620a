"""Attention heads on a model axis that does not divide them: replicated or zero-padded KV heads.

NOTE: tensor parallelism splits the query heads and the KV heads over the model
axis, and every query head must sit on the same device as the KV head it reads.
A checkpoint has H query heads in K groups of G = H / K. For tp devices:

  * tp divides K: nothing changes; each device holds K / tp whole groups.
  * K divides tp: each KV head is replicated r = tp / K times and its G query
    heads are dealt out over the r copies, ceil(G / r) per copy, with zero query
    heads filling the last copy (the same KV head on several devices, as vLLM does).
  * otherwise: K is padded with zero KV heads up to a multiple of tp, each with
    a group of G zero query heads.

Query heads are never refused: the padded layout keeps the output exact. A zero
query head has zero rows in the q and o projections (and zero biases), so
whatever it attends to, it adds nothing to the output; a zero KV head is read
only by zero query heads. The cost is compute and KV-cache memory on the padded
heads, so `HeadLayout.describe()` says how many are served.

    SmolLM2 (H=9, K=3) on tp=2, padded:     KV  [0 1 | 2 -]
                                            Q   [0 1 2 3 4 5 | 6 7 8 - - -]
    H=6, K=2 on tp=4, replicated:           KV  [0 | 0 | 1 | 1]
                                            Q   [0 1 | 2 - | 3 4 | 5 -]

The served arrays are the checkpoint's arrays gathered along their "heads" and
"kv_heads" axes through an index map (-1: a zero head). A fused q/k/v weight
has a "kv_heads" axis followed by a "qkv" axis of G + 2 (the group's G query
heads, then its K and its V head); the two are gathered together, to
(served KV heads, served G + 2). That needs only the logical axis names, so no
model is known here.
"""

import math
from dataclasses import dataclass

import numpy as np

HEADS, KV_HEADS, QKV = "heads", "kv_heads", "qkv"  # the logical axis names this layout rewrites


@dataclass(frozen=True)
class HeadLayout:
    num_heads: int  # H in the checkpoint
    num_kv_heads: int  # K in the checkpoint
    tp: int  # devices on the model axis
    q_index: tuple[int, ...]  # served query head -> checkpoint query head, -1 for a zero head
    kv_index: tuple[int, ...]  # served KV head -> checkpoint KV head, -1 for a zero head

    @property
    def served_heads(self) -> int:
        return len(self.q_index)

    @property
    def served_kv_heads(self) -> int:
        return len(self.kv_index)

    @property
    def served_group(self) -> int:
        return self.served_heads // self.served_kv_heads

    @property
    def is_identity(self) -> bool:
        return self.q_index == tuple(range(self.num_heads)) and self.kv_index == tuple(range(self.num_kv_heads))

    def served_shape(self, axes: tuple | None, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of an array as served, given its checkpoint shape and logical axes."""
        sizes = {HEADS: self.served_heads, KV_HEADS: self.served_kv_heads, QKV: self.served_group + 2}
        return tuple(sizes.get(a, n) for a, n in zip(axes or (None,) * len(shape), shape))

    def pad(self, axes: tuple | None, x):
        """Gather `x` (numpy or jax) along its "heads" / "kv_heads" (/ "qkv") axes into the served layout."""
        if self.is_identity or not axes:
            return x
        if QKV in axes:  # (.., K, G + 2, ..): gather the flattened pair, then split it again
            a = axes.index(QKV) - 1
            assert axes[a] == KV_HEADS, f"a {QKV!r} axis must follow a {KV_HEADS!r} axis: {axes}"
            flat = _take(x.reshape(x.shape[:a] + (-1,) + x.shape[a + 2:]), a, self._qkv_index())
            return flat.reshape(x.shape[:a] + (self.served_kv_heads, self.served_group + 2) + x.shape[a + 2:])
        for axis, name in enumerate(axes):
            index = {HEADS: self.q_index, KV_HEADS: self.kv_index}.get(name)
            if index is not None:
                x = _take(x, axis, index)
        return x

    def _qkv_index(self) -> list[int]:
        """Served (KV head, slot) -> checkpoint (KV head, slot), flattened; slots: G query heads, K, V."""
        g, served = self.num_heads // self.num_kv_heads, self.served_group
        index = []
        for j, kv in enumerate(self.kv_index):
            for s in range(served):
                q = self.q_index[j * served + s]
                index.append(-1 if q < 0 else (q // g) * (g + 2) + q % g)
            index += [-1, -1] if kv < 0 else [kv * (g + 2) + g, kv * (g + 2) + g + 1]
        return index

    def describe(self) -> str:
        if self.is_identity:
            return f"{self.num_heads} query / {self.num_kv_heads} KV heads, {self.num_kv_heads // self.tp} KV per device"
        how = "replicated" if -1 not in self.kv_index else "zero-padded"
        return (
            f"tp={self.tp} does not divide the {self.num_kv_heads} KV heads: serving {self.served_kv_heads} KV heads "
            f"({how}) and {self.served_heads} query heads (checkpoint: {self.num_heads}); "
            f"tp values that divide the KV heads: {_divisors(self.num_kv_heads)}"
        )


def head_layout(num_heads: int, num_kv_heads: int, tp: int) -> HeadLayout:
    """How H query and K KV heads are laid out over tp devices (see the module NOTE)."""
    h, k = num_heads, num_kv_heads
    if h % k:
        raise ValueError(f"{h} query heads do not form groups over {k} KV heads")
    g = h // k
    if k % tp == 0:
        return HeadLayout(h, k, tp, tuple(range(h)), tuple(range(k)))
    if tp % k == 0:
        r = tp // k
        per_copy = math.ceil(g / r)
        kv_index = tuple(j // r for j in range(tp))
        q_index = tuple(
            (j // r) * g + i if (i := (j % r) * per_copy + s) < g else -1 for j in range(tp) for s in range(per_copy)
        )
        return HeadLayout(h, k, tp, q_index, kv_index)
    served_k = math.ceil(k / tp) * tp
    kv_index = tuple(j if j < k else -1 for j in range(served_k))
    q_index = tuple(q if q < h else -1 for q in range(served_k * g))
    return HeadLayout(h, k, tp, q_index, kv_index)


def _take(x, axis: int, index):
    """x gathered along `axis` by `index`; -1 gives zeros."""
    index = np.asarray(index)
    keep = (index >= 0).reshape([-1 if a == axis else 1 for a in range(x.ndim)])
    return x.take(np.maximum(index, 0), axis=axis) * keep.astype(x.dtype)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
