"""A preallocated KV cache with per-layer lengths: O(1) append and crop, no re-concatenation.

HF's DynamicCache concatenates every new key onto the old ones (a copy of the whole cache per
token and layer) and crops by slicing. Speculative decoding appends a few positions and crops
back after every block, so here the keys and values of each layer live in one buffer
[kv_heads, capacity, head_dim] and a layer's content is the prefix [0, length). Cropping only
moves the length; the stale tail is overwritten by the next append and never attended to. The
buffer doubles (one copy) when an append would overflow it.

The method names mirror DynamicCache's where they mean the same (`get_seq_length`, `crop`), so
the decoder treats both caches alike.
"""

from __future__ import annotations

import torch


class StaticKVCache:
    """Keys and values of `num_layers` attention layers for one sequence (batch 1).

    keys[i] / values[i]: [kv_heads, capacity, head_dim] buffers; lengths[i]: positions held by
    layer i (its content is keys[i][:, :lengths[i]]). Layers fill independently (the drafter's
    shallow layers run ahead of the verifier's deep ones inside a block).
    """

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        if num_layers < 1 or kv_heads < 1 or head_dim < 1 or capacity < 1:
            raise ValueError(
                f"StaticKVCache needs positive sizes, got layers={num_layers} kv_heads={kv_heads} "
                f"head_dim={head_dim} capacity={capacity}"
            )
        self.num_layers = num_layers
        self._shape = (kv_heads, capacity, head_dim)
        # empty, not zeros: nothing past a layer's length is ever read
        self.keys = [torch.empty(self._shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(self._shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = [0] * num_layers

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[1]

    def get_seq_length(self, layer: int = 0) -> int:
        return self.lengths[layer]

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store keys/values [kv_heads, T, head_dim] at positions [length, length + T) of `layer`;
        return that layer's whole content (views [kv_heads, length + T, head_dim])."""
        key_buffer, value_buffer, start = self.reserve(layer, keys.shape[1])
        end = start + keys.shape[1]
        key_buffer[:, start:end] = keys
        value_buffer[:, start:end] = values
        return key_buffer[:, :end], value_buffer[:, :end]

    def reserve(self, layer: int, rows: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Make room for `rows` positions after `layer`'s content and count them as held; return
        that layer's whole buffers (keys, values [kv_heads, capacity, head_dim]) and the first
        reserved position, for a kernel that writes the rows itself (layer_ops.rope_append)."""
        start = self.lengths[layer]
        if start + rows > self.capacity:
            self._grow(start + rows)
        self.lengths[layer] = start + rows
        return self.keys[layer], self.values[layer], start

    def crop(self, length: int) -> None:
        """Keep positions [0, length) in every layer (layers already shorter are unchanged)."""
        if length < 0:
            raise ValueError(f"crop length must be >= 0, got {length}")
        self.lengths = [min(n, length) for n in self.lengths]

    def _grow(self, needed: int) -> None:
        capacity = max(needed, 2 * self.capacity)
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                new = old.new_empty((old.shape[0], capacity, old.shape[2]))
                new[:, : self.lengths[i]] = old[:, : self.lengths[i]]
                store[i] = new
