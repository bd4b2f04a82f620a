"""HF safetensors folders: single and sharded files, bf16, tying, placement, and the refusals."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from ckpt_builders import tiny_hf_config, tiny_hf_weights, write_hf_folder
from safetensors import safe_open
from safetensors.numpy import save_file

from models.loaders import CheckpointError, iter_tensors, load_params, read_config
from models.loaders.safetensors_hf import read_raw


def test_single_file_gives_every_parameter_unchanged(tmp_path, rng):
    weights = tiny_hf_weights(rng)
    stored = weights | {"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(2, np.float32)}
    folder = write_hf_folder(tmp_path / "ckpt", stored, tiny_hf_config())
    got = dict(iter_tensors(folder))
    assert got.keys() == weights.keys()  # inv_freq is not a parameter
    for name, array in weights.items():
        assert got[name].dtype == np.float32
        np.testing.assert_array_equal(got[name], array)
    assert read_config(folder) == tiny_hf_config()


def test_sharded_folder_reads_every_shard(tmp_path, rng):
    weights = tiny_hf_weights(rng)
    folder = write_hf_folder(tmp_path / "ckpt", weights, tiny_hf_config(), shards=3)
    assert len(list(folder.glob("*.safetensors"))) == 3
    got = dict(iter_tensors(str(folder)))
    assert got.keys() == weights.keys()
    for name, array in weights.items():
        np.testing.assert_array_equal(got[name], array)


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, jnp.bfloat16, "bfloat16"])
def test_bf16_checkpoint(tmp_path, rng, dtype):
    weights = {n: a.astype(ml_dtypes.bfloat16) for n, a in tiny_hf_weights(rng).items()}
    folder = write_hf_folder(tmp_path / "ckpt", weights, tiny_hf_config(torch_dtype="bfloat16"))
    as_f32 = dict(iter_tensors(folder, np.float32))
    as_bf16 = dict(iter_tensors(folder, dtype))
    for name, array in weights.items():
        assert as_f32[name].dtype == np.float32 and as_bf16[name].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(as_f32[name], array.astype(np.float32))  # bf16 -> f32 is exact
        np.testing.assert_array_equal(as_bf16[name].view(np.uint16), array.view(np.uint16))


def test_float32_checkpoint_read_as_bf16_rounds_to_nearest(tmp_path, rng):
    weights = tiny_hf_weights(rng)
    folder = write_hf_folder(tmp_path / "ckpt", weights, tiny_hf_config())
    got = dict(iter_tensors(folder, "bfloat16"))
    for name, array in weights.items():
        np.testing.assert_array_equal(got[name].view(np.uint16), array.astype(ml_dtypes.bfloat16).view(np.uint16))


def test_raw_reader_matches_safe_open(tmp_path, rng):
    file = tmp_path / "x.safetensors"
    arrays = {"a": rng.standard_normal((3, 5)).astype(ml_dtypes.bfloat16), "b": np.arange(7, dtype=np.float16)}
    save_file(arrays, str(file))
    with safe_open(file, framework="numpy") as f:
        for name in arrays:
            raw = read_raw(file, name)
            assert raw.dtype == arrays[name].dtype
            np.testing.assert_array_equal(raw, f.get_tensor(name))


def test_tied_checkpoint_drops_a_stored_lm_head(tmp_path, rng):
    weights = tiny_hf_weights(rng)
    folder = write_hf_folder(tmp_path / "ckpt", weights, tiny_hf_config(tie_word_embeddings=True))
    names = [name for name, _ in iter_tensors(folder)]
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names


def test_load_params_places_each_tensor(tmp_path, rng):
    weights = tiny_hf_weights(rng)
    folder = write_hf_folder(tmp_path / "ckpt", weights, tiny_hf_config())
    seen = []

    def place(name, array):
        assert isinstance(array, np.ndarray) and array.dtype == ml_dtypes.bfloat16
        seen.append(name)
        return jax.device_put(array)

    params = load_params(folder, place, dtype=jnp.bfloat16)
    assert sorted(seen) == sorted(weights) and len(seen) == len(weights)
    assert params["model.norm.weight"].dtype == jnp.bfloat16

    default = load_params(folder)
    assert isinstance(default["lm_head.weight"], jax.Array)
    np.testing.assert_array_equal(np.asarray(default["lm_head.weight"]), weights["lm_head.weight"])


def test_unsupported_dtype_is_refused(tmp_path, rng):
    folder = write_hf_folder(tmp_path / "ckpt", tiny_hf_weights(rng), tiny_hf_config())
    with pytest.raises(ValueError, match="int8"):
        iter_tensors(folder, np.int8)


# ---- refusals and broken checkpoints: each message names the file and says what to do


def test_pickle_folder_is_refused_with_the_reason(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(tiny_hf_config()))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 not really a pickle")
    with pytest.raises(CheckpointError) as e:
        list(iter_tensors(folder))
    message = str(e.value)
    assert "pytorch_model.bin" in message and "arbitrary code" in message and "safetensors" in message


@pytest.mark.parametrize("name", ["model.pt", "weights.pth", "pytorch_model.bin"])
def test_pickle_file_is_refused(tmp_path, name):
    (tmp_path / name).write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="pickle"):
        read_config(tmp_path / name)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        iter_tensors(tmp_path / name)


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="nope.*no such file or folder"):
        read_config(tmp_path / "nope")


def test_missing_config_json(tmp_path, rng):
    folder = write_hf_folder(tmp_path / "ckpt", tiny_hf_weights(rng), tiny_hf_config())
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: missing"):
        read_config(folder)
    with pytest.raises(CheckpointError, match="config.json: missing"):
        iter_tensors(folder)


def test_corrupt_config_json(tmp_path, rng):
    folder = write_hf_folder(tmp_path / "ckpt", tiny_hf_weights(rng), tiny_hf_config())
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not readable JSON"):
        read_config(folder)


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_hf_config()))
    with pytest.raises(CheckpointError, match="neither model.safetensors nor"):
        iter_tensors(tmp_path)


def test_missing_shard(tmp_path, rng):
    folder = write_hf_folder(tmp_path / "ckpt", tiny_hf_weights(rng), tiny_hf_config(), shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors: missing.*download"):
        iter_tensors(folder)


def test_truncated_safetensors(tmp_path, rng):
    folder = write_hf_folder(tmp_path / "ckpt", tiny_hf_weights(rng), tiny_hf_config())
    file = folder / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file.*download"):
        list(iter_tensors(folder))


def test_integer_weights_are_refused(tmp_path, rng):
    weights = tiny_hf_weights(rng) | {"model.layers.0.self_attn.q_proj.qweight": np.zeros((4, 4), np.int32)}
    folder = write_hf_folder(tmp_path / "ckpt", weights, tiny_hf_config())
    with pytest.raises(CheckpointError, match="qweight.*int32.*GPTQ"):
        list(iter_tensors(folder))


def test_a_safetensors_file_instead_of_its_folder(tmp_path, rng):
    folder = write_hf_folder(tmp_path / "ckpt", tiny_hf_weights(rng), tiny_hf_config())
    with pytest.raises(CheckpointError, match="pass an HF checkpoint folder"):
        read_config(folder / "model.safetensors")
