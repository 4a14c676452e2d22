"""`zaya serve` against hostile clients: text the tokenizer refuses, huge prompts beside a running stream,
requests a web page could forge, connections that never finish their headers; and how it starts: a busy
port, logs under a root logger that already has a handler."""

import concurrent.futures
import json
import logging
import socket
import subprocess
import sys
import time

import httpx
import pytest

pytest.importorskip("fastapi")

from serve_util import demo_server  # noqa: E402

from zaya_jax.infer.serve.app import Guard  # noqa: E402
from zaya_jax.infer.serve.cli import allowed_hosts, configure_logging  # noqa: E402

MODEL = "zaya-demo"
HEADER_TIMEOUT = 2.0
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "12+34+56"}], "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    with demo_server(tmp_path_factory, "--slots", "4", "--max-body-bytes", str(3 << 20),
                     "--header-timeout", str(HEADER_TIMEOUT)) as u:
        yield u


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, timeout=120) as c:
        yield c


def error_of(response, status):
    assert response.status_code == status, response.text
    return response.json()["error"]


@pytest.mark.parametrize("text", ["1+\U0001F600", "1+\u00e9", "1+\ud800"])
def test_text_the_tokenizer_refuses_is_a_400_on_both_routes(http, text):
    body = {"model": MODEL, "prompt": text, "max_tokens": 2}
    raw = json.dumps(body)  # ASCII: a lone surrogate goes out as the JSON escape \ud800
    error = error_of(http.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"}), 400)
    assert error["param"] == "prompt" and error["message"].startswith("prompt 0: the t"), error
    chat = {**CHAT, "messages": [{"role": "user", "content": text}]}
    raw = json.dumps(chat)
    error = error_of(http.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"}), 400)
    assert error["param"] == "messages" and "TextInputSequence" not in error["message"], error
    assert http.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_huge_prompts_neither_stall_a_stream_nor_health(url, http):
    """Three clients post 1 MB prompts (refused as too long, by their length) while a 900-token stream runs:
    the stream and /health keep their pace."""
    long = {**CHAT, "stream": True, "ignore_eos": True, "max_tokens": 900}
    huge = {"model": MODEL, "prompt": "1" * (1 << 20), "max_tokens": 2}
    with http.stream("POST", "/v1/chat/completions", json=long) as stream:
        lines = stream.iter_lines()
        next(lines)
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            posts = [pool.submit(httpx.post, f"{url}/v1/completions", json=huge, timeout=120) for _ in range(6)]
            waits = []
            while not all(p.done() for p in posts):
                start = time.perf_counter()
                assert http.get("/health").status_code == 200
                waits.append(time.perf_counter() - start)
            for p in posts:
                error = error_of(p.result(), 400)
                assert "1,048,576 characters: at least" in error["message"] and error["param"] == "prompt", error
        assert max(waits) < 0.5, waits
        assert sum(1 for line in lines if line.startswith("data: {")) > 0
    error = error_of(http.post("/v1/completions", json={"model": MODEL, "prompt": [[5]] * 100_000, "max_tokens": 1}), 400)
    assert error["param"] == "n" and "needs 100000 sequences" in error["message"]


def test_requests_a_web_page_could_forge_are_refused(url, http):
    assert error_of(http.post("/v1/completions", content=b'{"model": "zaya-demo", "prompt": "1+2"}',
                              headers={"Content-Type": "text/plain"}), 415)["code"] == "unsupported_media_type"
    assert error_of(http.post("/v1/chat/completions", json=CHAT, headers={"Origin": "http://evil.example"}),
                    403)["code"] == "origin_not_allowed"
    assert error_of(http.get("/health", headers={"Host": "evil.example:8000"}), 400)["code"] == "host_not_allowed"
    assert error_of(http.post("/v1/chat/completions", json=CHAT, headers={"Host": "evil.example"}),
                    400)["code"] == "host_not_allowed"
    port = url.rsplit(":", 1)[1]
    for headers in ({"Origin": f"http://localhost:{port}"}, {"Host": f"localhost:{port}"}, {"Origin": "http://[::1]"}):
        assert http.post("/v1/chat/completions", json=CHAT, headers=headers).status_code == 200


def test_allowed_hosts_widen_what_the_guard_answers():
    def refusal(hosts, **headers):
        scope = {"type": "http", "method": "POST", "headers": [(k.encode(), v.encode()) for k, v in headers.items()]}
        error = Guard(None, hosts).refusal(scope)
        return error and error.status

    json_type = {"content-type": "application/json; charset=utf-8"}
    default = allowed_hosts("127.0.0.1", "")
    assert refusal(default, host="127.0.0.1:8000", **json_type) is None
    assert refusal(default, host="box.lan:8000", **json_type) == 400
    assert refusal(allowed_hosts("0.0.0.0", "box.lan"), host="box.lan:8000", origin="http://box.lan", **json_type) is None
    assert refusal(allowed_hosts("0.0.0.0", "*"), host="any.where", origin="https://any.where", **json_type) is None
    assert refusal(default, host="localhost", origin="null", **json_type) == 403
    assert refusal(default, host="localhost") == 415


def test_connections_that_never_finish_their_headers_are_closed(url, http):
    host, port = url.removeprefix("http://").split(":")
    sockets = [socket.create_connection((host, int(port)), timeout=10) for _ in range(50)]
    try:
        for s in sockets:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # the blank line never comes
        time.sleep(HEADER_TIMEOUT + 2)
        assert http.get("/health").status_code == 200
        for s in sockets:
            assert s.recv(1024) == b""  # closed by the server
    finally:
        for s in sockets:
            s.close()


def test_a_busy_port_is_refused_before_the_model_loads(url):
    port = url.rsplit(":", 1)[1]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "zaya_jax.cli", "serve", "--port", port], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1 and f"error: [Errno 98] cannot listen on 127.0.0.1:{port}: Address already in use" in \
        proc.stderr, proc.stderr[-2000:]
    assert "warm-up" not in proc.stderr and time.perf_counter() - start < 60


def test_server_logs_reach_a_root_handler_set_before():
    class Kept(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append((record.name, record.getMessage()))

    root, kept = logging.getLogger(), Kept()
    saved = root.level, logging.getLogger("zaya").level
    root.addHandler(kept)  # an embedding program's handler: logging.basicConfig then does nothing
    root.setLevel(logging.WARNING)
    try:
        configure_logging("info")
        logging.getLogger("zaya.serve").info("engine compiled")
        assert ("zaya.serve", "engine compiled") in kept.messages
    finally:
        root.removeHandler(kept)
        root.setLevel(saved[0])
        logging.getLogger("zaya").setLevel(saved[1])
