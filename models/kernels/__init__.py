"""Paged-attention implementations behind `models.attention.paged_attention`.

`reference` is pure jnp and defines the function every faster kernel must compute.
"""
