"""The ``zaya serve`` command: load the model once, compile the engine with a warm-up request, serve."""

from __future__ import annotations

import logging
import os

from zaya_jax.cli import add_model_args, bounded_arg, is_demo_model, resolve_model

log = logging.getLogger("zaya.serve")


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve the model over OpenAI's HTTP API (/v1/completions, "
                                            "/v1/chat/completions, /v1/models), Markov RSA as a chat extension")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=bounded_arg(0, 65535), default=8000)
    p.add_argument("--slots", type=int, default=64, help="sequences decoded together (the engine's slot pool)")
    p.add_argument("--max-len", type=int, default=None, help="tokens per sequence, prompt + output (default: the "
                                                             "model's context)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="sequences that may wait for a slot; beyond slots + this, requests get 429")
    p.add_argument("--decode-steps", type=int, default=8, help="decode steps per engine round trip (streaming "
                                                                "granularity)")
    p.add_argument("--api-key", default=os.environ.get("ZAYA_API_KEY"),
                   help="require `Authorization: Bearer KEY` on every route but /health (default: $ZAYA_API_KEY)")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: zaya-demo for the "
                                                      "shipped demo model, else the directory's name)")
    p.add_argument("--max-body-bytes", type=bounded_arg(1), default=1 << 20, help="larger request bodies get 400")
    p.add_argument("--mesh", default=None, help="device mesh, e.g. data=2,expert=2 (default: one device)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=_serve_command)


def _serve_command(args) -> int:
    try:
        import uvicorn

        from .app import Server, create_app
    except ImportError as e:
        raise SystemExit(f"error: zaya serve needs the serve extra: pip install 'zaya-jax[serve]' ({e})")
    from zaya_jax import sharding

    from ..engine import Engine
    from ..tokenizer import Tokenizer
    from .driver import Driver

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
    config, params, desc = resolve_model(args.model, args.compute_dtype, args.allow_non_finite)
    mesh = None
    if args.mesh:
        mesh = sharding.make_mesh(**sharding.parse_mesh(args.mesh))
        params = sharding.shard_params(params, config, mesh)
    tokenizer = Tokenizer.from_dir(args.model)
    engine = Engine(params, config, slots=args.slots, max_len=args.max_len, decode_steps=args.decode_steps, mesh=mesh)
    driver = Driver(engine)
    seconds = driver.warm_up(tokenizer.encode("0"), max_new_tokens=2 * args.decode_steps)
    log.info("model %s: %d slots x %d tokens; engine compiled by a warm-up request in %.1f s", desc, engine.slots,
             engine.max_len, seconds)
    driver.start()
    default_name = "zaya-demo" if is_demo_model(args.model) else os.path.basename(os.path.normpath(args.model))
    name = args.model_name or default_name
    server = Server(driver=driver, tokenizer=tokenizer, model_id=name, model_path=args.model,
                    capacity=engine.slots + args.max_queue, api_key=args.api_key, max_body_bytes=args.max_body_bytes)
    try:
        uvicorn.run(create_app(server), host=args.host, port=args.port, log_level=args.log_level)
    finally:
        driver.close()
    return 0
