"""Write smollm2_gguf_slices.npz: a few SmolLM2 weights as HF transformers reads them from the GGUF.

The reference for `tests/models/loaders/test_smollm2.py`: transformers dequantizes
the same file with its own code (and undoes llama.cpp's Q/K row order its own way),
so matching it checks our names, layouts, dequantization and un-permutation at once.

Run with an environment that has torch, transformers (>= 4.41) and gguf; pagedjax is
not imported:

    python tests/golden/make_gguf_golden.py PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf

The output is byte-for-byte reproducible (fixed zip timestamps, fixed key order).
"""

import hashlib
import io
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
OUT = Path(__file__).with_name("smollm2_gguf_slices.npz")

# Rows cover both halves of head 0 (head_dim 64: rows 0-31 and 32-63), head 1 of Q
# (row 64) and the last K row, so a wrong Q/K row order cannot go unnoticed.
ROWS = np.array([0, 1, 31, 32, 33, 63, 64, 191])
MATRICES = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.0.self_attn.v_proj.weight",
    "model.layers.0.self_attn.o_proj.weight",
    "model.layers.0.mlp.gate_proj.weight",
    "model.layers.29.self_attn.q_proj.weight",
    "model.layers.29.self_attn.k_proj.weight",
]
VECTORS = ["model.layers.0.input_layernorm.weight", "model.norm.weight"]


def main(gguf_path: Path) -> None:
    digest = hashlib.sha256(gguf_path.read_bytes()).hexdigest()
    if digest != SHA256:
        sys.exit(f"{gguf_path}: sha256 {digest} is not the SmolLM2-135M-Instruct Q4_1 file ({SHA256})")
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    state = {name: t.detach().numpy() for name, t in model.state_dict().items()}
    arrays = {"rows": ROWS}
    arrays |= {name: np.ascontiguousarray(state[name][ROWS], dtype=np.float32) for name in MATRICES}
    arrays |= {name: state[name].astype(np.float32) for name in VECTORS}
    write_npz(OUT, arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez, but with fixed timestamps so the same arrays always give the same bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, arrays[name], allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
