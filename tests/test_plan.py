"""``zaya plan``: programs compiled ahead of time for a TPU topology (libtpu) on this CPU host.

Small configs on v5e:2x2 (4 chips, 16 GiB each): what fits and what does not, the costs' layer
extrapolation against a fully unrolled compile, per-chip argument bytes against the sharding rules, and the
command's JSON and errors.
"""

import dataclasses
import json
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("libtpu")

from zaya_jax import aot, backend, cli, model  # noqa: E402
from zaya_jax import plan as pl  # noqa: E402
from zaya_jax import sharding as shd  # noqa: E402
from zaya_jax.bench_configs import CONFIGS  # noqa: E402
from zaya_jax.config import ZayaConfig  # noqa: E402
from zaya_jax.train import loss  # noqa: E402

TINY = ZayaConfig(**CONFIGS["tiny"])
# Widths that are whole TPU tiles (bf16: 16 x 128), so per-chip bytes carry no padding.
ALIGNED = ZayaConfig(**{**CONFIGS["tiny"], "hidden_size": 256, "moe_intermediate_size": 128, "num_experts": 8})
TOPOLOGY = "v5e:2x2"


@pytest.fixture(autouse=True)
def _tpu_precision():
    """The TPU programs as a TPU user compiles them: the suite's "highest" matmul precision (for CPU parity)
    would make every bf16 dot a multi-pass float32 one, which the TPU's ragged-dot kernel refuses."""
    with jax.default_matmul_precision("default"):
        yield


@pytest.fixture(scope="module")
def topo():
    return aot.topology(TOPOLOGY)


def test_unknown_topology_and_missing_libtpu_are_named(monkeypatch, capsys):
    with pytest.raises(aot.PlanError, match="unknown TPU topology 'v9z:2x2'"):
        aot.topology("v9z:2x2")
    assert cli.main(["plan", "zaya1-8b", "--topology", "v9z:2x2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown TPU topology 'v9z:2x2'" in err[0]
    monkeypatch.setitem(sys.modules, "libtpu", None)  # import fails as without the package
    with pytest.raises(aot.PlanError, match=r'pip install -e "\.\[tpu\]"'):
        aot.require_libtpu()


def test_single_chip_topology(topo):
    one = aot.topology("v5e:1x1")
    assert len(one.devices) == 1 and aot.chip_of(one.devices).name == "v5e"
    assert len(topo.devices) == 4


def test_decode_fits_on_one_side_of_the_hbm_line_and_not_on_the_other(topo):
    """The pool of a tiny model: 8 slots fit; 2^19 slots x 256 tokens do not (a float32 cache of 64 GiB, its
    rows split over the 4 chips: 16 GiB each)."""
    mesh = shd.make_mesh(expert=4, devices=topo.devices)
    chip = aot.chip_of(topo.devices)
    capacity = chip.hbm_bytes - pl.RESERVED_BYTES
    reports = {}
    for slots in (8, 1 << 19):
        settings = pl.ServeSettings(slots=slots, max_len=256, dtype="float32")
        program = pl.serve_programs(TINY, mesh, settings)[0][0]
        reports[slots] = aot.plan_program(program, TINY, mesh, chip, with_cost=False, capacity=capacity)
    small, large = reports[8], reports[1 << 19]
    assert small.fits and small.error is None and 0 < small.hbm_bytes["total"] < capacity
    assert not large.fits
    # Either the compiler refuses (its message names HBM) or its total is past the capacity.
    assert (large.error and "HBM" in large.error) or large.hbm_bytes["total"] > capacity


def test_layer_extrapolation_matches_an_unrolled_compile(topo):
    """Cost at 10 layers from the 4- and 8-layer unrolled compiles == the 10-layer program compiled unrolled."""
    mesh = shd.make_mesh(data=4, devices=topo.devices)
    config = dataclasses.replace(ALIGNED, num_hidden_layers=10, layer_types=("hybrid",) * 10)
    program = pl.serve_programs(config, mesh, pl.ServeSettings(slots=4, max_len=64, dtype="bfloat16"))[0][0]
    costs = {}
    for layers in (*aot.COST_LAYERS, 10):
        small = dataclasses.replace(config, num_hidden_layers=layers, layer_types=config.layer_types[:layers])
        with backend.unrolled():
            compiled, _, err = aot.compile_for(lambda: program.build(small), mesh)
        assert err is None
        costs[layers] = aot.cost(compiled)
    rolled, _, _ = aot.compile_for(lambda: program.build(config), mesh)
    predicted = costs[4].extrapolate(costs[8], 4, 2)
    assert predicted.flops == pytest.approx(costs[10].flops, rel=0.02)
    assert predicted.bytes_accessed == pytest.approx(costs[10].bytes_accessed, rel=0.05)
    # The reason for all this: the rolled program's cost counts the layer loop's body once.
    assert aot.cost(rolled).flops < 0.6 * costs[10].flops


def test_sharded_param_argument_bytes_follow_the_rules(topo):
    """The experts' gate_up on a chip: a quarter of it over expert=4, all of it over data=4."""
    for sizes, share in (({"expert": 4}, 4), ({"data": 4}, 1)):
        mesh = shd.make_mesh(**sizes, devices=topo.devices)
        params = pl.abstract_params(ALIGNED, mesh, jnp.bfloat16)
        leaf = params["layers"]["experts"]["gate_up"]
        compiled, _, _ = aot.compile_for(lambda: (jax.jit(lambda w: jnp.sum(w, dtype=jnp.float32)), (leaf,), {}), mesh)
        whole = math.prod(leaf.shape) * 2
        assert compiled.memory_analysis().argument_size_in_bytes == whole // share
        assert aot.per_chip_bytes(leaf) == whole // share


def test_train_step_compiles_with_its_optimizer_state_and_costs_its_loss_chunks(topo, monkeypatch):
    """The train step fits, and its cost, with the loss-chunk loop rolled and costed by difference (7 chunks
    of 40 tokens here: an odd count, so ``unroll=2`` leaves one inline), equals that of the whole step compiled
    unrolled."""
    monkeypatch.setattr(loss, "CHUNK_LOGITS", 40 * ALIGNED.vocab_size)
    mesh = shd.make_mesh(fsdp=4, devices=topo.devices)
    chip = aot.chip_of(topo.devices)
    program, tokens = pl.train_program(ALIGNED, mesh, pl.TrainSettings(batch_size=4, seq_len=64, remat="full"))
    assert tokens == 256 and program.loops == (("loss_chunks", 7),)
    # The cost compiles only: a 2-layer model is compiled at its full size for its cost, so its HBM is the step's.
    report = aot.plan_program(program, ALIGNED, mesh, chip, full=False)
    assert report.hbm_bytes["total"] <= chip.hbm_bytes - pl.RESERVED_BYTES
    # float32 params + two Adam moments, split over fsdp along embed: arguments hold at least those.
    params = jax.eval_shape(lambda: model.init(ALIGNED, jax.random.key(0)))
    param_bytes = sum(math.prod(a.shape) * 4 for a in jax.tree.leaves(params))
    assert report.hbm_bytes["arguments"] >= 3 * param_bytes / 4
    with backend.unrolled():
        unrolled, _, _ = aot.compile_for(lambda: program.build(ALIGNED), mesh)
    whole = aot.cost(unrolled)
    # With the loop rolled and not costed by difference, the FLOPs counted were 8% short (379 against 412 M).
    assert report.flops == pytest.approx(whole.flops, rel=0.01)
    assert report.bytes_accessed == pytest.approx(whole.bytes_accessed, rel=0.05)


def test_loop_copies_follow_the_scan_lowering():
    """``lax.scan(unroll=u)`` over n trips: a loop of u copies and n % u inline; u >= n unrolls all n."""
    assert [aot.loop_copies(7, u) for u in (1, 2, 3, 7, 8)] == [1, 3, 4, 7, 7]
    assert [aot.loop_copies(n, 2) for n in (1, 2, 4)] == [1, 2, 2]


def test_collectives_are_read_from_hlo():
    text = """
  %all-reduce.1 = f32[8,128]{1,0} all-reduce(f32[8,128]{1,0} %p), replica_groups={}
  %ag = (bf16[4,256]{1,0}, bf16[16,256]{1,0}) all-gather-start(bf16[4,256]{1,0} %x)
  %done = bf16[16,256]{1,0} all-gather-done(%ag)
  %fusion = f32[2]{0} fusion(%a), kind=kLoop
"""
    out = aot.collectives(text)
    assert out == {"all-reduce": {"count": 1, "bytes": 8 * 128 * 4}, "all-gather": {"count": 1, "bytes": 16 * 256 * 2}}


def test_cost_extrapolation_is_linear_in_layers():
    four = aot.Cost(10.0, 100.0, {"all-reduce": {"count": 4, "bytes": 16}})
    eight = aot.Cost(22.0, 220.0, {"all-reduce": {"count": 8, "bytes": 32}, "all-gather": {"count": 4, "bytes": 16}})
    forty = four.extrapolate(eight, 4, 32)
    assert (forty.flops, forty.bytes_accessed) == (22.0 + 32 * 3, 220.0 + 32 * 30)
    assert forty.collectives == {"all-gather": {"count": 36, "bytes": 144}, "all-reduce": {"count": 40, "bytes": 160}}


def test_unrolled_scans_compute_the_same_logits():
    params = model.init(TINY, jax.random.key(0))
    ids = jnp.asarray(np.arange(1, 9)[None] % TINY.vocab_size, jnp.int32)
    ctx = model.uncached_context(jnp.ones_like(ids))
    rolled = jax.jit(lambda p: model.apply(p, TINY, ids, ctx)[0])(params)
    with backend.unrolled():
        unrolled = jax.jit(lambda p: model.apply(p, TINY, ids, ctx)[0])(params)
    np.testing.assert_allclose(np.asarray(unrolled), np.asarray(rolled), rtol=1e-6, atol=1e-6)


def test_zaya_plan_serve_json(tmp_path, capsys):
    """The command end to end on a config.json: JSON keys, every program fitting, max_slots checked (in this
    process: the child processes of the default are covered by the test below and cost a start each).

    128 layers and 2,048 cache positions, so that max_slots is hundreds: there the pool dominates the decode
    program's HBM and the fitted answer holds at its one check compile (with 16 positions the answer is
    thousands of slots, where the MoE's temporaries outgrow the fit and the check bisects: six compiles more).
    Prefill chunks of 64 tokens keep the prefill's cost compiles small."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY.replace(num_hidden_layers=128, layer_types=["hybrid"] * 128).to_hf_dict()))
    assert cli.main(["plan", str(path), "--topology", TOPOLOGY, "--task", "serve", "--slots", "8", "--max-len", "2048",
                     "--prefill-chunk", "64", "--compute-dtype", "float32", "--in-process", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is True and out["chips"] == 4 and out["chip"]["name"] == "v5e"
    names = [p["name"] for p in out["programs"]]
    assert names[0].startswith("decode[slots=8,cache=2048") and any(n.startswith("prefill") for n in names)
    assert any(n.startswith("insert") for n in names)
    chip = aot.CHIPS["TPU v5 lite"]
    for p in out["programs"]:
        h = p["hbm_bytes"]
        assert set(h) == {"arguments", "outputs", "temporaries", "total"}
        assert 0 < h["total"] <= h["arguments"] + h["outputs"] + h["temporaries"]
        if p["flops"] is not None:
            assert p["estimate_seconds"] == pytest.approx(max(p["flops"] / chip.peak_flops,
                                                              p["bytes_accessed"] / chip.hbm_bandwidth))
    assert out["programs"][0]["flops"] > 0 and out["max_slots"] >= 8 and out["max_slots_check"]["checked"]
    assert out["max_slots"] % 4 == 0  # the pool's rows split over the 4 chips


def test_a_compile_that_dies_is_that_programs_error_not_the_plans():
    """Each program compiles in a child process: one that ends without a report (here: a name the child
    cannot build; a crash of the TPU compiler ends it the same way) comes back as an error."""
    req = pl.PlanRequest(TINY, TOPOLOGY, "serve", serve=pl.ServeSettings(slots=4, max_len=16, dtype="float32"))
    result, why = pl.compile_isolated(req, "no such program", timeout=300)
    assert result is None and why.startswith("the compile failed (exit 1)")
