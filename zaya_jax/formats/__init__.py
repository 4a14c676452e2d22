"""The params on disk, read and written a layer slice at a time (below ``load`` and ``zaya convert``).

``layout``: the native HF tensor layout and its map onto the param pytree; ``legacy``: the legacy
80-layer names; ``hf_reader``: a validated HF checkpoint directory; ``orbax_store``: the params as an
orbax checkpoint; ``tree``: the params in host memory; ``converted``: a ``zaya convert`` directory.
"""
