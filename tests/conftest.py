"""Test-wide set-up: eight CPU devices, and jaxtyping checks every annotated array shape in models/ at run time."""

import jax
from jaxtyping import install_import_hook

# Eight fake CPU devices in every test process, for the mesh tests (tests/sharding/);
# set before anything initialises a JAX backend. Single-device code uses the first.
jax.config.update("jax_num_cpu_devices", 8)

install_import_hook(["models"], "beartype.beartype")
