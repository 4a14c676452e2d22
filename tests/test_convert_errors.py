"""Bad inputs to the converter: each gets an error naming the tensor, key or file, and leaves no output."""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import zaya_jax
from zaya_jax import convert
from zaya_jax.convert import CheckpointError
from zaya_jax.formats.hf_reader import HFCheckpoint

O_PROJ = "model.layers.1.self_attn.o_proj.weight"


def _tensors(src):
    return load_file(src / "model.safetensors")


def _rewrite(src, tensors):
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})


def _edit_config(src, **changes):
    config = json.loads((src / "config.json").read_text())
    config.update(changes)
    (src / "config.json").write_text(json.dumps(config))


def assert_rejected(src, match, error=CheckpointError):
    """convert() and load() both fail with ``match``; no output directory or temporary is left."""
    dst = src.parent / "dst"
    with pytest.raises(error, match=match):
        convert.convert(src, dst, progress=False)
    assert not dst.exists()
    assert sorted(os.listdir(src.parent)) == ["src"]
    with pytest.raises(error, match=match):
        zaya_jax.load(src)


def test_missing_tensor(src):
    tensors = _tensors(src)
    del tensors[O_PROJ]
    _rewrite(src, tensors)
    assert_rejected(src, rf"missing tensor\(s\): {O_PROJ}")


def test_unexpected_tensor(src):
    _rewrite(src, dict(_tensors(src), **{"model.layers.0.mlp.extra.weight": np.zeros(3, np.float32)}))
    assert_rejected(src, r"unexpected tensor\(s\): model\.layers\.0\.mlp\.extra\.weight")


def test_shape_mismatch(src):
    tensors = _tensors(src)
    tensors[O_PROJ] = tensors[O_PROJ][:, :-1].copy()
    _rewrite(src, tensors)
    assert_rejected(src, rf"tensor '{O_PROJ}' has shape \(64, 63\), config.json implies \(64, 64\)")


def test_unsupported_tensor_dtype(src):
    tensors = _tensors(src)
    tensors[O_PROJ] = tensors[O_PROJ].astype(np.float64)
    _rewrite(src, tensors)
    assert_rejected(src, rf"tensor '{O_PROJ}' has unsupported dtype F64")


def test_unsupported_target_dtype(src):
    assert_rejected_dtype = pytest.raises(CheckpointError, match=r"unsupported dtype 'int8'")
    with assert_rejected_dtype:
        convert.convert(src, src.parent / "dst", dtype="int8", progress=False)
    assert not (src.parent / "dst").exists()


def test_truncated_file(src):
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[:-100])
    assert_rejected(src, r"cannot read safetensors file .*model\.safetensors: .*not fully covered")


def test_corrupt_header(src):
    data = bytearray((src / "model.safetensors").read_bytes())
    data[8:16] = b"\x00garbage"
    (src / "model.safetensors").write_bytes(bytes(data))
    assert_rejected(src, r"cannot read safetensors file .*model\.safetensors")


def _shard(src):
    """Splits the single file into two shards with an index."""
    tensors = _tensors(src)
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        file = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, src / file)
        weight_map.update(dict.fromkeys(part, file))
    os.remove(src / "model.safetensors")
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_sharded_checkpoint_converts(src):
    _shard(src)
    convert.convert(src, src.parent / "dst", progress=False)
    assert zaya_jax.load(src.parent / "dst")[1]["embed"].shape == (256, 64)


def test_index_points_at_missing_shard(src):
    _shard(src)
    os.remove(src / "model-00002-of-00002.safetensors")
    assert_rejected(src, r"maps tensor '[\w.]+' to missing shard 'model-00002-of-00002.safetensors'")


def test_index_names_tensor_absent_from_shard(src):
    _shard(src)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"][O_PROJ] = "model-00001-of-00002.safetensors" if index["weight_map"][O_PROJ].startswith(
        "model-00002") else "model-00002-of-00002.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_rejected(src, rf"maps tensor '{O_PROJ}' to model-0000\d-of-00002.safetensors, which lacks it")


def test_invalid_index(src):
    _shard(src)
    (src / "model.safetensors.index.json").write_text("{not json")
    assert_rejected(src, r"is not a valid safetensors index")


def test_no_weights(src):
    os.remove(src / "model.safetensors")
    assert_rejected(src, r"no model.safetensors.index.json or model.safetensors in")


def test_config_with_fewer_layers_than_weights(src):
    _edit_config(src, num_hidden_layers=1, layer_types=["hybrid"])
    assert_rejected(src, r"unexpected tensor\(s\): model\.layers\.1\..*config.json says num_hidden_layers=1, "
                         r"the weights reach layer 1")


def test_config_with_other_widths_than_weights(src):
    _edit_config(src, moe_intermediate_size=16)
    assert_rejected(src, r"tensor 'model\.layers\.0\.mlp\.experts\.gate_up_proj' has shape \(4, 64, 64\), "
                         r"config.json implies \(4, 32, 64\)")


def test_invalid_config(src):
    _edit_config(src, num_attention_heads=3)
    assert_rejected(src, r"`num_attention_heads` \(3\) must be divisible", error=zaya_jax.ConfigError)


def test_existing_destination_is_kept_without_force(src):
    dst = src.parent / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="pass --force"):
        convert.convert(src, dst, progress=False)
    assert os.listdir(dst) == ["keep.txt"]


def test_destination_inside_source_is_refused(src):
    with pytest.raises(CheckpointError, match="must lie outside the source"):
        convert.convert(src, src / "out", progress=False)
    assert not (src / "out").exists()


def test_failure_midway_leaves_nothing_and_keeps_old_output(src, monkeypatch):
    """A read error after writing has begun: no partial output, and a --force target survives intact."""
    dst = src.parent / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    real_read, calls = HFCheckpoint.read, []

    def failing_read(self, item):
        calls.append(item.name)
        if len(calls) == 10:
            raise CheckpointError(f"cannot read tensor {item.name!r}: simulated I/O error")
        return real_read(self, item)

    monkeypatch.setattr(HFCheckpoint, "read", failing_read)
    with pytest.raises(CheckpointError, match="simulated I/O error"):
        convert.convert(src, dst, force=True, progress=False)
    assert len(calls) == 10
    assert os.listdir(dst) == ["keep.txt"]
    assert sorted(os.listdir(src.parent)) == ["dst", "src"]


def test_export_rejects_config_that_disagrees_with_params(src):
    dst = src.parent / "dst"
    convert.convert(src, dst, progress=False)
    _edit_config(dst, hidden_size=32, head_dim=8)
    with pytest.raises(CheckpointError, match=r"param embed has shape \(256, 64\), config.json implies \(256, 32\)"):
        convert.export(dst, src.parent / "hf", progress=False)
    assert not (src.parent / "hf").exists()


def test_converted_dir_with_a_lost_chunk_file_is_refused(src):
    """tensorstore reads an absent zarr chunk as zeros; every chunk is written (zero ones included), so
    a lost one is refused by load, export and verify, naming the param and the file."""
    from zaya_jax import checkpoint
    from zaya_jax.formats import checksums
    from zaya_jax.formats.orbax_store import missing_chunks

    config, params = zaya_jax.load(src)  # a leaf of zeros keeps its chunk files on disk
    params["layers"]["router"]["balancing_biases"] = np.zeros_like(params["layers"]["router"]["balancing_biases"])
    checkpoint.save(src.parent / "zeros", config, params)
    zero_leaf = src.parent / "zeros" / "params" / "layers.router.balancing_biases"
    assert missing_chunks(str(zero_leaf)) == []
    assert len([n for n in os.listdir(zero_leaf) if not n.startswith(".")]) == config.num_hidden_layers
    assert not np.any(zaya_jax.load(src.parent / "zeros")[1]["layers"]["router"]["balancing_biases"])

    dst = src.parent / "dst"
    convert.convert(src, dst, progress=False)
    params = dst / "params"
    os.remove(params / "embed" / "0.0")
    match = r"param embed is missing 1 chunk file\(s\) of its zarr array \(first: .*embed/0\.0\)"
    with pytest.raises(CheckpointError, match=match):
        zaya_jax.load(dst)
    with pytest.raises(CheckpointError, match=match):
        convert.export(dst, src.parent / "hf", progress=False)
    assert not (src.parent / "hf").exists()
    with pytest.raises(CheckpointError, match=match):
        checksums.verify(src, dst)
