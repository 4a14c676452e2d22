"""One process of the two-process test (tests/test_multihost.py): joins the run with
``jax.distributed.initialize`` over CPU collectives (gloo), loads the model straight into an 8-device
mesh spanning both processes, runs the forward (and greedy generation when asked) and process 0 saves
the results.

usage: multihost_worker.py PROCESS_ID PORT MODEL_DIR INPUTS.npz OUT.npz [MESH] [NEW_TOKENS]
"""

import sys

import jax

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_default_matmul_precision", "highest")


def main(process_id: int, port: int, model_dir: str, inputs: str, out: str, mesh_text: str = "data=2,expert=2,tensor=2",
         new_tokens: int = 0) -> None:
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id,
                               initialization_timeout=120)
    import numpy as np
    from jax.experimental import multihost_utils

    import zaya_jax
    from zaya_jax import sharding as shd

    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
    mesh = shd.make_mesh(**shd.parse_mesh(mesh_text))
    config, params = zaya_jax.load(model_dir, mesh=mesh)
    data = np.load(inputs)
    ids, mask = data["ids"], data["mask"]
    rows = shd.batch_sharding(mesh, batch=ids.shape[0])

    def global_array(a):  # each process supplies the rows its devices hold
        return jax.make_array_from_callback(a.shape, rows, lambda index: a[index])

    results = {}
    with jax.set_mesh(mesh):
        logits = zaya_jax.forward(params, config, global_array(ids), global_array(mask))
        results["logits"] = multihost_utils.process_allgather(logits, tiled=True)
        if new_tokens:
            from zaya_jax.infer import generate

            prompts = [list(map(int, row[m.astype(bool)])) for row, m in zip(ids, mask)]
            result = generate(params, config, prompts, max_new_tokens=new_tokens, stop_token_ids=[])
            width = max(len(t) for t in result.tokens)
            results["tokens"] = np.array([t + [-1] * (width - len(t)) for t in result.tokens])
    if process_id == 0:
        np.savez(out, **results)
    multihost_utils.sync_global_devices("done")
    jax.distributed.shutdown()


if __name__ == "__main__":
    args = sys.argv[1:]
    main(int(args[0]), int(args[1]), args[2], args[3], args[4], *args[5:6], *map(int, args[6:7]))
