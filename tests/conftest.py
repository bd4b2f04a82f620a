"""Test-wide set-up: jaxtyping checks every annotated array shape in models/ and the sampler at run time."""

from jaxtyping import install_import_hook

install_import_hook(["models", "engine.sampling"], "beartype.beartype")
