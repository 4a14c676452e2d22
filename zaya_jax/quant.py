"""Weight-only quantization: int8 with a scale per output channel; int4: the experts at 4 bits with a scale per
group of 32 input rows, the other quantized leaves at int8 (a ``Scheme`` may hold each leaf differently).

A quantized weight is a :class:`QuantizedArray`: ``values`` (integers) of the weight's own shape and
``scales`` (float32) of the same rank, equal to the weight's shape except on the axis its matmul
contracts (the input axis), where it is 1 (a scale per output channel) or ``K / group`` (a scale per
group of ``group`` input rows; the layout qwix's ``QArray`` uses). ``weight ~= values * scales``
broadcast over each group; symmetric: ``scale = max |w| / qmax`` over the group, ``values = round(w / scale)``.

``QuantizedArray`` is a pytree node whose two children are keyed like a dict's (``values``, ``scales``):
the params stay a nested dict of arrays for ``jax.tree``, orbax and the sharding specs, and a leaf's
logical axes name its values and scales alike. Indexing its leading axes (a layer, an expert, the rows
of an embedding) indexes both. The matmul helpers here read the integer values and scale inside the
step: per output channel, ``(x @ values) * scales`` (the scale is applied to the product, never to the
weight); per group, each group's rows are scaled as they are read.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ParamPath = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Scheme:
    """How weights are quantized: ``bits`` per value, ``group_size`` input rows per scale (None: one scale per
    output channel), except the leaves ``overrides`` names (``(param path, bits, group_size)``), held as it says.
    A contracting width that ``group_size`` does not divide gets one scale per channel."""

    name: str
    bits: int
    group_size: int | None
    overrides: tuple[tuple[ParamPath, int, int | None], ...] = ()

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def group(self, rows: int) -> int:
        """Input rows per scale for a weight contracting ``rows``."""
        return self.group_size if self.group_size and rows % self.group_size == 0 else rows

    def of(self, path: ParamPath) -> Scheme:
        """The scheme leaf ``path`` is quantized with (under this scheme's name)."""
        bits, group = next(((b, g) for p, b, g in self.overrides if p == path), (self.bits, self.group_size))
        return Scheme(self.name, bits, group)

    def record(self) -> dict[str, dict]:
        """Each ``QUANTIZED`` leaf's bits and group size, by its ``/``-joined path (config.json keeps it)."""
        return {"/".join(path): {"bits": self.of(path).bits, "group_size": self.of(path).group_size}
                for path in QUANTIZED}


def from_record(name: str, record: dict[str, dict] | None) -> Scheme:
    """The scheme a checkpoint was written with: ``name`` with each leaf as ``record`` (``Scheme.record``) says;
    without a record, the ``SCHEMES`` one of that name."""
    s = scheme(name)
    if record is None:
        return s
    unknown = set(record) - {"/".join(path) for path in QUANTIZED}
    if unknown:
        raise ValueError(f"quantization record names leaves that are not quantized: {sorted(unknown)}")
    return dataclasses.replace(s, overrides=tuple((tuple(key.split("/")), leaf["bits"], leaf["group_size"])
                                                  for key, leaf in record.items()))


VALUES_DTYPE = np.dtype(np.int8)  # int4 values too: XLA:CPU holds jnp.int4 in a byte each as well
SCALES_DTYPE = np.dtype(np.float32)

_DENSE = ("kernel",)
# The quantized param leaves, with the axis their matmul contracts (of one layer's slice, or of the global
# leaf). The tied embedding is the LM head's ``[V, D]`` transpose: it contracts D, so its scales are per
# vocabulary row, which also serve its row lookups.
QUANTIZED: dict[ParamPath, int] = {
    ("embed",): -1,
    ("lm_head",): -2,
    **{("layers", "attn", "cca", name) + _DENSE: -2 for name in ("q_proj", "k_proj", "v_current", "v_delayed")},
    ("layers", "attn", "o_proj") + _DENSE: -2,
    **{("layers", "router", name) + _DENSE: -2 for name in ("down", "fc1", "fc2", "out")},
    ("layers", "experts", "gate_up"): -2,
    ("layers", "experts", "down"): -2,
}

# int4: the experts (most of the bytes) at 4 bits with a scale per 32 input rows; the rest (embedding / LM
# head, attention projections, router), whose error moves the logits most per byte, at int8 (docs/quantization.md).
SCHEMES = {"int8": Scheme("int8", 8, None),
           "int4": Scheme("int4", 4, 32, tuple((path, 8, None) for path in QUANTIZED if path[:2] != ("layers", "experts")))}


def scheme(name: str | Scheme | None) -> Scheme | None:
    """``"int8"`` / ``"int4"`` (or a Scheme, or None) -> Scheme or None; ValueError names the choices."""
    if name is None or isinstance(name, Scheme):
        return name
    if name not in SCHEMES:
        raise ValueError(f"unknown quantization {name!r}; choose one of {sorted(SCHEMES)}")
    return SCHEMES[name]


@jax.tree_util.register_pytree_with_keys_class
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
    """values: integers, the weight's shape; scales: float32, the weight's shape but 1 or ``K / group`` on
    the contracting axis; scheme: the ``SCHEMES`` name it was quantized with (static)."""

    values: Any
    scales: Any
    scheme: str

    shape = property(lambda self: self.values.shape)
    ndim = property(lambda self: self.values.ndim)
    dtype = property(lambda self: self.values.dtype)  # narrow.use_blocks reads the bytes per value
    T = property(lambda self: self.map(lambda a: a.T))

    def map(self, fn) -> QuantizedArray:
        """``fn`` applied to values and scales alike (an index or slice of leading axes, a transpose)."""
        return QuantizedArray(fn(self.values), fn(self.scales), self.scheme)

    def __getitem__(self, index) -> QuantizedArray:
        """Indexes leading axes (where scales are full-size) of values and scales alike."""
        return self.map(lambda a: a[index])

    def tree_flatten_with_keys(self):
        keys = jax.tree_util.DictKey("values"), jax.tree_util.DictKey("scales")
        return tuple(zip(keys, (self.values, self.scales))), self.scheme

    @classmethod
    def tree_unflatten(cls, scheme, children):
        return cls(*children, scheme)


def is_quantized(x) -> bool:
    return isinstance(x, QuantizedArray)


def contracting_axis(values_shape, scales_shape) -> int | None:
    """The axis the scales are grouped along (where they differ from the values), or None."""
    axes = [a for a, (v, s) in enumerate(zip(values_shape, scales_shape)) if v != s]
    return axes[0] if axes else None


def scale_shape(shape: tuple[int, ...], axis: int, s: Scheme) -> tuple[int, ...]:
    """The scales' shape of a weight of ``shape`` contracting ``axis`` under scheme ``s``."""
    axis = axis % len(shape)
    out = list(shape)
    out[axis] = shape[axis] // s.group(shape[axis])
    return tuple(out)


def _grouped(a, axis: int, groups: int):
    """``a`` with ``axis`` split into ``(groups, rows per group)``."""
    shape = a.shape
    return a.reshape(shape[:axis] + (groups, shape[axis] // groups) + shape[axis + 1:])


def _quantize_block(w, axis: int, s: Scheme, xp):
    """(values, scales) of ``w`` (numpy or jax, per ``xp``) along ``axis``; scales float32."""
    axis = axis % w.ndim
    groups = w.shape[axis] // s.group(w.shape[axis])
    g = _grouped(w.astype(xp.float32), axis, groups)
    amax = xp.max(xp.abs(g), axis=axis + 1, keepdims=True)
    # Products with float32 reciprocals, not divisions: XLA rewrites a division by a broadcast value into
    # that product, so written so, numpy (the converter) and jax (in memory) round every value alike.
    scale = xp.where(amax > 0, amax * xp.float32(1.0 / s.qmax), 1.0).astype(xp.float32)
    values = xp.clip(xp.round(g * (1.0 / scale)), -s.qmax, s.qmax).astype(VALUES_DTYPE).reshape(w.shape)
    return values, xp.squeeze(scale, axis + 1)


# Rows of a leading axis quantized at a time on the host (float32 bytes), so a converter holds one tensor
# in its stored dtype plus a block.
HOST_BLOCK_BYTES = 64 << 20


def quantize_host(w: np.ndarray, axis: int, s: Scheme) -> tuple[np.ndarray, np.ndarray]:
    """A numpy weight -> (values int8, scales float32), in blocks of its first axis unless that is ``axis``."""
    axis = axis % w.ndim
    if axis == 0 or w.ndim == 1:
        return _quantize_block(w, axis, s, np)
    values = np.empty(w.shape, VALUES_DTYPE)
    scales = np.empty(scale_shape(w.shape, axis, s), SCALES_DTYPE)
    step = max(1, HOST_BLOCK_BYTES // (int(np.prod(w.shape[1:])) * 4))
    for start in range(0, w.shape[0], step):
        values[start:start + step], scales[start:start + step] = _quantize_block(w[start:start + step], axis, s, np)
    return values, scales


def quantize(w, axis: int, s: Scheme) -> QuantizedArray:
    """A jax (or abstract) weight -> QuantizedArray along ``axis``."""
    return QuantizedArray(*_quantize_block(w, axis, s, jnp), s.name)


def _dequantize_block(values, scales, dtype, xp):
    """``values * scales`` (numpy or jax, per ``xp``) in ``dtype``, each scale over its group of rows."""
    axis = contracting_axis(values.shape, scales.shape)
    if axis is None:
        return (values.astype(xp.float32) * scales).astype(dtype)
    w = _grouped(values, axis, scales.shape[axis]).astype(xp.float32) * xp.expand_dims(scales, axis + 1)
    return w.reshape(values.shape).astype(dtype)


def dequantize(q, dtype=jnp.float32):
    """``values * scales`` in ``dtype`` (a float ``q`` is only cast): the full-precision weight. The matmul
    helpers below avoid it; it serves tests, export and the grouped paths of many-row calls."""
    if not is_quantized(q):
        return q.astype(dtype)
    return _dequantize_block(q.values, q.scales, dtype, jnp)


def dequantize_host(values: np.ndarray, scales: np.ndarray, dtype) -> np.ndarray:
    """The numpy counterpart of ``dequantize`` (export)."""
    return _dequantize_block(values, scales, dtype, np)


def astype(w, dtype):
    """A float weight cast to ``dtype``; a quantized one as it is (its matmuls compute in the input's dtype)."""
    return w if is_quantized(w) else w.astype(dtype)


def per_channel(q: QuantizedArray) -> bool:
    """Whether ``q [..., K, N]`` has one scale per output channel (``scales [..., 1, N]``)."""
    return q.scales.shape[-2] == 1


def matmul(x, w, preferred_element_type=None):
    """``x [..., K] @ w [..., K, N]`` (numpy broadcasting of the leading axes) for a float or quantized ``w``.

    Quantized: the int values are cast to ``x``'s dtype (exact for int8 in bfloat16) and the product is
    accumulated in float32; per-channel scales multiply the product, grouped ones the weight's rows.
    The result has ``x``'s dtype unless ``preferred_element_type``.
    """
    if not is_quantized(w):
        return jnp.matmul(x, w, preferred_element_type=preferred_element_type)
    out_dtype = preferred_element_type or x.dtype
    if per_channel(w):
        y = jnp.matmul(x, w.values.astype(x.dtype), preferred_element_type=jnp.float32) * w.scales
    else:
        y = jnp.matmul(x, dequantize(w, x.dtype), preferred_element_type=jnp.float32)
    return y.astype(out_dtype)


def result_dtype(x, w):
    """The dtype ``x @ w`` gives: float weights promote as jax does, quantized ones give ``x``'s."""
    return x.dtype if is_quantized(w) else jnp.result_type(x, w)


def quantize_params(params: dict, s: Scheme | str) -> dict:
    """A float param pytree with the ``QUANTIZED`` leaves quantized (in memory; also under ``jax.eval_shape``)."""
    s = scheme(s)

    def one(path, leaf):
        key = tuple(k.key for k in path)
        return quantize(leaf, QUANTIZED[key], s.of(key)) if key in QUANTIZED else leaf

    return jax.tree_util.tree_map_with_path(one, params)


def scheme_of(params: dict) -> str | None:
    """The ``SCHEMES`` name a param pytree was quantized with, or None for float params."""
    w = params["layers"]["experts"]["gate_up"]
    return w.scheme if is_quantized(w) else None


def require_float(params: dict, what: str) -> None:
    """Refuses quantized params (ValueError) where only float weights work (training)."""
    name = scheme_of(params)
    if name is not None:
        raise ValueError(f"{what} needs float weights; these are quantized ({name}): start from the unquantized "
                         "checkpoint")


def from_stored(tree: dict, scheme_name: str | None) -> dict:
    """A param tree as stored (each quantized leaf a ``{"values", "scales"}`` dict) -> with QuantizedArrays."""
    if set(tree) == {"values", "scales"}:
        return QuantizedArray(tree["values"], tree["scales"], scheme_name)
    return {k: from_stored(v, scheme_name) if isinstance(v, dict) else v for k, v in tree.items()}


def scale_spec(spec, q: QuantizedArray):
    """The PartitionSpec of ``q.scales`` given that of ``q.values``: axes the scales hold one entry of
    (a per-channel contracting axis) are replicated."""
    names = tuple(spec) + (None,) * (q.ndim - len(tuple(spec)))
    return jax.sharding.PartitionSpec(*(None if s == 1 and v != 1 else n
                                        for n, v, s in zip(names, q.values.shape, q.scales.shape)))


def specs_like(spec, w):
    """A spec for ``w``: ``spec`` itself for a float weight, a QuantizedArray of specs for a quantized one."""
    return QuantizedArray(spec, scale_spec(spec, w), w.scheme) if is_quantized(w) else spec
