"""The ``zaya serve`` command: load the model once, compile the engine with a warm-up request, serve."""

from __future__ import annotations

import logging
import os
import socket

from zaya_jax.cli import add_model_args, bounded_arg, resolve_model
from zaya_jax.demo import is_demo_model

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
    p.add_argument("--metrics-key", default=os.environ.get("ZAYA_METRICS_KEY"),
                   help="the key /metrics takes instead of --api-key (default: $ZAYA_METRICS_KEY)")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: zaya-demo for the "
                                                      "shipped demo model, else the directory's name)")
    p.add_argument("--max-body-bytes", type=bounded_arg(1), default=1 << 20, help="larger request bodies get 400")
    p.add_argument("--allowed-hosts", default="",
                   help="comma-separated host names the server answers to in Host and Origin headers besides localhost, "
                        "127.0.0.1, ::1 and --host ('*': any); others are refused (DNS rebinding, cross-site posts)")
    p.add_argument("--header-timeout", type=bounded_arg(0, kind=float, above=True), default=10.0,
                   help="seconds a connection may take to send a request's headers before it is closed (default 10)")
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

    configure_logging(args.log_level)
    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
    listener = listen(args.host, args.port)  # before the model loads: a busy port is refused at once
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
                    capacity=engine.slots + args.max_queue, api_key=args.api_key, metrics_key=args.metrics_key,
                    max_body_bytes=args.max_body_bytes,
                    allowed_hosts=allowed_hosts(args.host, args.allowed_hosts))
    config = uvicorn.Config(create_app(server), log_level=args.log_level, http=header_timeout_protocol(args.header_timeout))
    try:
        uvicorn.Server(config).run(sockets=[listener])
    finally:
        driver.close()
    return 0


def configure_logging(level: str) -> None:
    """The server's logs (``zaya.*``) at ``level``, also when the root logger already has a handler (then
    ``basicConfig`` does nothing and they go to that handler)."""
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("zaya").setLevel(level.upper())


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` for the server; OSError naming the address when it cannot be had."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def allowed_hosts(host: str, extra: str) -> frozenset[str] | None:
    """The host names the server answers to: the local ones, the bound ``host`` and ``extra`` (comma-separated;
    ``*``: any, None)."""
    from .app import LOCAL_HOSTS

    names = {n.strip().lower().strip("[]") for n in extra.split(",") if n.strip()}
    return None if "*" in names else LOCAL_HOSTS | names | {host.lower().strip("[]")}


def header_timeout_protocol(seconds: float):
    """uvicorn's h11 protocol, closing a connection that has not sent a whole request head within
    ``seconds`` of opening or of its previous response: uvicorn sets no such limit, so clients that never
    finish their headers would hold connections forever."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        header_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.arm()

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:  # a request head arrived
                self.disarm()

        def on_response_complete(self) -> None:
            self.arm()  # before the next request's head, which a pipelined client may have sent already
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            self.disarm()
            super().connection_lost(exc)

        def arm(self) -> None:
            self.disarm()
            self.header_timer = self.loop.call_later(seconds, self.headers_late)

        def disarm(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def headers_late(self) -> None:
            if self.conn.their_state is h11.IDLE:
                self.transport.close()

    return Protocol
