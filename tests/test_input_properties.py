"""Property tests of the input boundaries: ``zaya_jax.forward``, the JSONL reader, the training data reader
and the converter's safetensors validation. Random shapes, ids, lengths, knobs and corrupted bytes either
work (and give what an independent oracle expects) or raise the project's own error type naming the
problem: never an error from inside JAX, safetensors or numpy, and never silent garbage.

Shapes the model accepts are drawn from a few buckets so that only a handful of programs compile."""

import json
import math
import os
import re
import struct
import tempfile

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

import zaya_jax
from zaya_jax.config import ZayaConfig
from zaya_jax.convert import CheckpointError
from zaya_jax.demo import DEFAULT_MODEL_DIR
from zaya_jax.formats import layout
from zaya_jax.formats.hf_reader import HFCheckpoint
from zaya_jax.infer.tokenizer import Tokenizer
from zaya_jax.jsonl import read_objects
from zaya_jax.train.data import DataError, load_examples

PROPERTY = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
CONFIG = ZayaConfig(vocab_size=48, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                    head_dim=16, moe_intermediate_size=16, num_experts=2, router_hidden_size=8,
                    max_position_embeddings=12)


@pytest.fixture(scope="module")
def params():
    """Small random weights straight from the layout table (no compiled init): scales near one."""
    rng, tree = np.random.default_rng(0), {}
    for entry, shape, dtype in layout.leaves(CONFIG, np.float32):
        centre = 1.0 if entry.path[-1] in ("scale", "temp", "state_scale", "hidden_scale", "residual_scale") else 0.0
        layout.set_path(tree, entry.path, jax.numpy.asarray(centre + 0.1 * rng.standard_normal(shape), dtype))
    return tree


# --- zaya_jax.forward --------------------------------------------------------------------------------------

VALID_SHAPES = [(1, 5), (2, 12)]  # the only shapes that reach the compiler
INVALID_SHAPES = [(0, 5), (2, 0), (1, 13), (5,), (1, 2, 3), ()]


@st.composite
def forward_inputs(draw):
    shape = draw(st.sampled_from(VALID_SHAPES + INVALID_SHAPES))
    dtype = draw(st.sampled_from([np.int32, np.int64, np.uint8, np.float32, np.bool_]))
    low, high = draw(st.sampled_from([(0, CONFIG.vocab_size), (-3, CONFIG.vocab_size), (0, CONFIG.vocab_size + 3)]))
    ids = np.asarray(draw(st.lists(st.integers(low, high - 1), min_size=int(np.prod(shape)),
                                   max_size=int(np.prod(shape)))), np.int64).reshape(shape)
    ids = ids.astype(dtype) if dtype != np.uint8 else np.clip(ids, 0, None).astype(dtype)
    mask = draw(st.sampled_from(["none", "ones", "left_pad", "twos", "wrong_shape", "float"]))
    moe_impl = draw(st.sampled_from(["auto", "auto", "auto", "bogus", "AUTO"]))
    return ids, mask, moe_impl


def _mask(kind, shape):
    if kind == "none":
        return None
    if kind == "wrong_shape":
        return np.ones((1, 3), np.int32)
    mask = np.ones(shape, np.float32 if kind == "float" else np.int32)
    if kind == "left_pad" and len(shape) == 2 and shape[1] > 1:
        mask[:, 0] = 0
    if kind == "twos":
        mask *= 2
    return mask


def _forward_problem(ids, mask_kind, moe_impl):
    """What is wrong with the inputs (None: nothing), decided without the code under test."""
    if ids.dtype.kind not in "iu":
        return "integers"
    if ids.ndim != 2 or 0 in ids.shape:
        return "shape" if ids.ndim != 2 else "at least one token"
    if ids.shape[1] > CONFIG.max_position_embeddings:
        return "max_position_embeddings"
    if ((ids < 0) | (ids >= CONFIG.vocab_size)).any():
        return "outside the vocabulary"
    if mask_kind == "wrong_shape":
        return "attention_mask shape"
    if mask_kind == "float":
        return "attention_mask must hold integers"
    if mask_kind == "twos":
        return "is not 0 or 1"
    if moe_impl != "auto":
        return "unknown moe_impl"
    return None


@PROPERTY
@given(forward_inputs())
def test_forward_runs_or_names_the_bad_input(params, case):
    ids, mask_kind, moe_impl = case
    mask = _mask(mask_kind, ids.shape)
    problem = _forward_problem(ids, mask_kind, moe_impl)
    if problem is None:
        logits = np.asarray(zaya_jax.forward(params, CONFIG, ids, mask, moe_impl=moe_impl))
        assert logits.shape == (*ids.shape, CONFIG.vocab_size) and np.isfinite(logits).all()
    else:
        with pytest.raises(zaya_jax.InputError, match=problem):
            zaya_jax.forward(params, CONFIG, ids, mask, moe_impl=moe_impl)


# --- the JSONL reader ----------------------------------------------------------------------------------

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
                           max_leaves=8)
LINES = st.one_of(
    st.dictionaries(st.text(max_size=5), json_values, max_size=3).map(lambda d: json.dumps(d).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),  # a non-object (or an object) on a line
    st.binary(max_size=20).map(lambda b: b.replace(b"\n", b"")),  # garbage, possibly not UTF-8
    st.sampled_from([b"", b"  ", b"\t\r", b"[" * 100_000, b'{"a": 1', b"\xef\xbb\xbf{}", b'{"a": 1e400}',
                     b'{"a": -Infinity}', b'{"a": ' + b"9" * 5000 + b"}"]),
)


def _finite(value) -> bool:
    """No NaN or infinity anywhere in a parsed JSON value (JSON has neither: Python's json writes and reads them)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(map(_finite, value))
    return all(map(_finite, value.values())) if isinstance(value, dict) else True


def _jsonl_oracle(lines):
    """The objects, or the number of the first line that must be refused."""
    objects = []
    for number, raw in enumerate(lines, 1):
        try:
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a byte order mark opens a file only
            if not text.strip():
                continue
            value = json.loads(text)
        except (ValueError, RecursionError):
            return number
        if not isinstance(value, dict) or not _finite(value):
            return number
        objects.append((number, value))
    return objects or 0


@settings(max_examples=60, deadline=None)
@given(st.lists(LINES, max_size=6))
def test_jsonl_reader_returns_the_objects_or_names_the_line(lines):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "f.jsonl")
        with open(path, "wb") as f:
            f.write(b"\n".join(lines))
        expected = _jsonl_oracle(lines)
        if isinstance(expected, list):
            assert read_objects(path, error=DataError) == expected
        else:
            where = f"{path}:{expected}:" if expected else f"{path} holds no records"
            with pytest.raises(DataError, match=re.escape(where)):
                read_objects(path, error=DataError)


# --- the training data reader -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_tokenizer():
    return Tokenizer.from_dir(DEFAULT_MODEL_DIR)


VOCAB = 80
BAD_ID = st.one_of(st.integers(-2, -1), st.integers(VOCAB, VOCAB + 2), st.integers(2**31, 2**70), st.booleans(),
                   st.floats(0, 5), st.text(max_size=1))


@st.composite
def ids_records(draw):
    """Pre-tokenized records: good ids, maybe one bad one spliced in; no mask, a good one or a bad one."""
    ids = draw(st.lists(st.integers(0, VOCAB - 1), max_size=12))
    if draw(st.booleans()):
        ids.insert(draw(st.integers(0, len(ids))), draw(BAD_ID))
    record = {"input_ids": ids}
    mask = draw(st.sampled_from(["absent", "good", "bad_value", "bool", "short"]))
    if mask != "absent":
        values = draw(st.lists(st.integers(0, 1), min_size=len(ids), max_size=len(ids)))
        if mask == "bad_value" and values:
            values[0] = draw(st.sampled_from([2, -1, 1.0]))
        if mask == "bool" and values:
            values[-1] = bool(values[-1])
        record["loss_mask"] = values[:-1] if mask == "short" else values
    return record


RECORDS = st.one_of(
    ids_records(),
    st.fixed_dictionaries({"text": st.one_of(st.text(st.characters(min_codepoint=32, max_codepoint=300), max_size=20),
                                             st.integers())}),
    st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", 3]),
         "content": st.one_of(st.text("0123456789+= ", max_size=8), st.none())}), max_size=3)}),
    st.dictionaries(st.sampled_from(["text", "input_ids", "other"]), st.just("x"), max_size=2),
)


@settings(PROPERTY, max_examples=60)
@given(st.lists(RECORDS, min_size=1, max_size=4), st.integers(-1, 16))
def test_training_data_is_checked_and_cut_or_refused_by_line(demo_tokenizer, tmp_path, records, seq_len):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    try:
        examples, report = load_examples(str(path), seq_len, VOCAB, demo_tokenizer, eos=1)
    except DataError as e:
        assert str(e).startswith(f"{path}"), e
        return
    assert report.examples == len(examples) >= 1
    for ex in examples:
        assert ex.ids.dtype == np.int32 and ex.loss_mask.dtype == np.int32
        assert 2 <= ex.ids.size <= seq_len and ex.ids.size == ex.loss_mask.size
        assert ex.ids.min() >= 0 and ex.ids.max() < VOCAB
        assert set(np.unique(ex.loss_mask)) <= {0, 1} and ex.loss_mask[1:].any()
    for r in records:  # all accepted: ids records held plain ints in range and a plain 0/1 mask as long
        if isinstance(r.get("input_ids"), list):
            ids, mask = r["input_ids"], r.get("loss_mask", [1] * len(r["input_ids"]))
            assert all(type(i) is int and 0 <= i < VOCAB for i in ids), f"accepted bad ids: {r}"
            assert len(mask) == len(ids) and all(type(v) is int and v in (0, 1) for v in mask), f"accepted: {r}"


# --- the converter's safetensors validation -------------------------------------------------------------

SMALL = ZayaConfig(vocab_size=16, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                   head_dim=4, moe_intermediate_size=4, num_experts=2, router_hidden_size=4)


@pytest.fixture(scope="module")
def checkpoint_bytes():
    """A valid single-file checkpoint of SMALL, built with numpy: (config.json text, model.safetensors bytes)."""
    rng = np.random.default_rng(0)
    tensors = {name: rng.standard_normal(entry.hf_shape(SMALL)).astype(np.float32)
               for name, entry, _ in layout.expected_tensors(SMALL)}
    with tempfile.TemporaryDirectory() as d:
        save_file(tensors, os.path.join(d, "model.safetensors"))
        with open(os.path.join(d, "model.safetensors"), "rb") as f:
            data = f.read()
    return json.dumps(SMALL.to_hf_dict()), data


@st.composite
def corruptions(draw, data_size):
    kind = draw(st.sampled_from(["truncate", "flip", "header_length", "header_field", "append"]))
    return kind, draw(st.integers(0, data_size - 1)), draw(st.integers(0, 255)), draw(st.integers(-2, 2**40))


def _corrupt(data: bytes, kind, position, byte, number) -> bytes:
    (header_len,) = struct.unpack("<Q", data[:8])
    if kind == "truncate":
        return data[:position]
    if kind == "flip":
        out = bytearray(data)
        out[position % (8 + header_len)] ^= byte or 1  # inside the length field or the header
        return bytes(out)
    if kind == "header_length":
        return struct.pack("<Q", number % 2**64) + data[8:]
    if kind == "header_field":  # a well-formed header with a wrong shape, dtype or offset
        header = json.loads(data[8:8 + header_len])
        name = sorted(k for k in header if k != "__metadata__")[position % (len(header) - 1)]
        field = ["shape", "dtype", "data_offsets"][byte % 3]
        header[name][field] = {"shape": [number % 7, 2], "dtype": ["F64", "I8", "BF16", "U8"][byte % 4],
                               "data_offsets": [number % 5000, number % 9000]}[field]
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        return struct.pack("<Q", len(text)) + text + data[8 + header_len:]
    return data + bytes([byte]) * (position % 64 + 1)


@PROPERTY
@given(st.data())
def test_corrupt_safetensors_are_refused_by_the_reader(checkpoint_bytes, tmp_path, data):
    config_text, good = checkpoint_bytes
    corrupted = _corrupt(good, *data.draw(corruptions(len(good))))
    (tmp_path / "config.json").write_text(config_text)
    (tmp_path / "model.safetensors").write_bytes(corrupted)
    try:
        ckpt = HFCheckpoint(str(tmp_path), SMALL)
        arrays = [(item, ckpt.read(item)) for item in ckpt.items]
    except CheckpointError as e:
        assert "model.safetensors" in str(e) or "tensor" in str(e), e
        return
    for item, array in arrays:  # accepted: every tensor is what the plan says
        assert array.shape == item.shape and array.dtype == item.dtype
