"""Files that reach the tests inside installed distributions (the default model, reference tokenizers)."""

import importlib.metadata
from pathlib import Path


def packaged_file(distribution: str, relative: str) -> Path:
    """A file inside an installed distribution, found without importing it (both are test dependencies)."""
    return Path(str(importlib.metadata.distribution(distribution).locate_file(relative)))
