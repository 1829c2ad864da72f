"""`lora-rm serve` under hostile and careless clients: a real uvicorn process, real sockets. Every case ends in a
4xx/503 or a clean exit, one clear log line and no traceback, and a probe request is answered within 1 s."""

from __future__ import annotations

import json
import signal
import socket
import sys
import threading
import time

import pytest
from test_serve import TEXTS, Server, _close

from lora_rm import cli
from lora_rm.evaluation.reward_model import RewardModel

httpx = pytest.importorskip("httpx")

TOKEN = "s3cret-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
CAP, HEADER_TIMEOUT, MAX_TOKENS = 40, 1.5, 200_000


@pytest.fixture(scope="module")
def guarded(trained_run, tmp_path_factory):
    """One server with short deadlines, a small connection cap and a token."""
    tmp = tmp_path_factory.mktemp("serve-attacks")
    server = Server(
        trained_run.adapter_dir, tmp / "guarded.log", "--batch-size", "8", "--token", TOKEN,
        "--header-timeout", str(HEADER_TIMEOUT), "--body-timeout", "2", "--max-connections", str(CAP),
        "--max-request-texts", "5000", "--max-request-tokens", str(MAX_TOKENS),
    )  # fmt: skip
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def model(trained_run) -> RewardModel:
    return RewardModel.from_pretrained(trained_run.adapter_dir)


def _address(server: Server) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def _probe(server: Server) -> float:
    """Seconds for one small /get_reward request, asserted answered 200 within 1 s."""
    start = time.monotonic()
    r = httpx.post(server.url + "/get_reward", json={"query": TEXTS[:2]}, headers=AUTH, timeout=10)
    took = time.monotonic() - start
    assert r.status_code == 200 and took < 1.0, (r.status_code, took)
    return took


def _raw(server: Server, data: bytes = b"") -> socket.socket:
    sock = socket.create_connection(_address(server), timeout=10)
    if data:
        sock.sendall(data)
    return sock


def _answer(sock: socket.socket) -> bytes:
    """What the server sent before closing (b"" when it closed without a word)."""
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    sock.close()
    return b"".join(chunks)


def _no_traceback(server: Server) -> None:
    assert "Traceback" not in server.output(), server.output()[-3000:]


def test_control_characters_are_text_scored_as_the_model_reads_them(guarded, model):
    texts = [
        "question : how do i cook rice ? \x1b[31m sure first\x1b[0m",
        "form\x0cfeed ok",
        "cp1252 \x92 quote",
    ]
    r = httpx.post(guarded.url + "/get_reward", json={"query": texts}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert _close(r.json()["rewards"], model.score_texts(texts))


def test_token_content_type_and_health(guarded):
    body = json.dumps({"query": TEXTS[:1]})
    cases = [
        ({}, 401, "missing `Authorization"),
        ({"authorization": "Bearer wrong"}, 401, "wrong token"),
        ({**AUTH, "content-type": "text/plain"}, 415, "got text/plain"),
        ({**AUTH, "content-type": "application/x-www-form-urlencoded"}, 415, "application/json"),
    ]
    for headers, status, reason in cases:
        r = httpx.post(
            guarded.url + "/get_reward", content=body, headers={"content-type": "application/json", **headers}
        )
        assert r.status_code == status and reason in r.json()["error"], (headers, r.status_code, r.text)
        assert "refused POST /get_reward from 127.0.0.1" in guarded.output()
    for query, status in ((f"?token={TOKEN}", 200), ("?token=wrong", 401)):  # for OpenRLHF's --remote_rm_url
        r = httpx.post(
            guarded.url + "/get_reward" + query, content=body, headers={"content-type": "application/json"}
        )
        assert r.status_code == status, r.text
    r = httpx.options(guarded.url + "/get_reward", headers={"origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers  # no CORS: a web page cannot read an answer
    health = httpx.get(guarded.url + "/health").json()
    assert "/" not in json.dumps(health["model"]) and health["model"] == "adapter"
    _no_traceback(guarded)


def test_nested_json_and_garbage_get_a_4xx(guarded):
    deep = b"[" * 100_000 + b"]" * 100_000
    r = httpx.post(
        guarded.url + "/get_reward", content=deep, headers={**AUTH, "content-type": "application/json"}
    )
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]
    nested = json.dumps({"query": [[[[["x"]]]]]}).encode()
    r = httpx.post(
        guarded.url + "/get_reward", content=nested, headers={**AUTH, "content-type": "application/json"}
    )
    assert r.status_code == 422 and "expected text, got list" in r.json()["error"]
    assert _answer(_raw(guarded, b"NOT HTTP AT ALL\r\n\r\n")).startswith(b"HTTP/1.1 400")
    _probe(guarded)
    _no_traceback(guarded)


def test_slow_headers_are_cut_and_a_probe_still_answers(guarded):
    socks = [_raw(guarded, b"POST /get_reward HTTP/1.1\r\nHost: x\r\n") for _ in range(CAP - 5)]
    _probe(guarded)
    for sock in socks:  # one header line more: still not the end of the headers
        sock.sendall(b"X-Slow: 1\r\n")
    _probe(guarded)
    time.sleep(HEADER_TIMEOUT + 0.5)
    answers = [_answer(s) for s in socks]
    assert all(a.startswith(b"HTTP/1.1 408") for a in answers), answers[:3]
    assert "its request headers took over 1.5 s (408)" in guarded.output()
    lines = [line for line in guarded.output().splitlines() if "took over" in line]
    assert len(lines) <= 6, lines  # throttled: 5 lines a window, then a count
    _probe(guarded)
    _no_traceback(guarded)


def test_slow_body_is_cut(guarded):
    sock = _raw(guarded, b"POST /get_reward HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                b"authorization: Bearer " + TOKEN.encode() + b"\r\ncontent-length: 1000\r\n\r\n{\"query\"")  # fmt: skip
    _probe(guarded)
    assert _answer(sock).startswith(b"HTTP/1.1 408")
    assert "its request body took over 2 s (408)" in guarded.output()
    _no_traceback(guarded)


def test_connections_past_the_cap_get_a_fast_503(guarded):
    time.sleep(0.5)  # the connections of earlier tests are closed
    socks = [_raw(guarded) for _ in range(CAP)]
    start = time.monotonic()
    answer = _answer(_raw(guarded))  # answered before it says a word
    assert answer.startswith(b"HTTP/1.1 503") and time.monotonic() - start < 1.0, answer
    for sock in socks:
        sock.close()
    time.sleep(0.3)
    _probe(guarded)
    assert "refused a connection: 503" in guarded.output()
    _no_traceback(guarded)


def test_a_huge_request_does_not_stall_small_ones(guarded, model):
    huge = [TEXTS[i % len(TEXTS)] for i in range(4000)]  # 500 forwards of 8
    done: list = []
    thread = threading.Thread(
        target=lambda: done.append(
            httpx.post(guarded.url + "/get_reward", json={"query": huge}, headers=AUTH, timeout=300)
        )
    )
    thread.start()
    while httpx.get(guarded.url + "/health").json()["pending_requests"] < 1:
        time.sleep(0.01)
    for _ in range(3):
        _probe(guarded)
    assert not done, "the huge request ended before the probes: too small to show anything"
    thread.join()
    assert done[0].status_code == 200 and len(done[0].json()["rewards"]) == 4000
    _no_traceback(guarded)


def test_a_request_over_the_token_cap_gets_a_413(guarded, model):
    text = " ".join(["question : how do i make a cake ?"] * 8)  # 64 tokens: cut to max_length, all counted
    n = min(len(model.tokenizer(text)["input_ids"]), model.max_length)
    fits = [text] * (MAX_TOKENS // n)
    r = httpx.post(guarded.url + "/get_reward", json={"query": fits + [text]}, headers=AUTH, timeout=60)
    assert r.status_code == 413 and "more than --max-request-tokens 200000" in r.json()["error"], r.text
    rows = {"prompts": [text] * (len(fits) + 1), "responses": [" sure"] * (len(fits) + 1)}
    r = httpx.post(guarded.url + "/score", json=rows, headers=AUTH, timeout=60)
    assert r.status_code == 413 and "tokens in" in r.json()["error"], r.text
    r = httpx.post(guarded.url + "/get_reward", json={"query": fits[:100]}, headers=AUTH, timeout=60)
    assert r.status_code == 200
    _no_traceback(guarded)


def test_a_disconnected_clients_rows_are_dropped(guarded):
    body = json.dumps({"query": [TEXTS[i % len(TEXTS)] for i in range(4000)]}).encode()
    head = f"POST /get_reward HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
    before = httpx.get(guarded.url + "/health").json()
    sock = _raw(guarded, head.encode() + f"authorization: Bearer {TOKEN}\r\n\r\n".encode() + body)
    while httpx.get(guarded.url + "/health").json()["pending_requests"] < 1:
        time.sleep(0.01)
    sock.close()
    deadline = time.monotonic() + 10
    while httpx.get(guarded.url + "/health").json()["pending_requests"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    after = httpx.get(guarded.url + "/health").json()
    assert after["sequences_dropped"] - before["sequences_dropped"] > 3000, (before, after)
    assert after["sequences_scored"] - before["sequences_scored"] < 1000
    assert "client disconnected before its answer" in guarded.output()
    _no_traceback(guarded)


@pytest.mark.parametrize("port", ["70000", "-1"])
def test_a_port_out_of_range_is_refused(port, capsys):
    assert cli.main(["serve", "--model", "runs/none", "--port", port]) == 2
    err = capsys.readouterr().err
    assert "--port: must be 1-65535" in err and "Traceback" not in err


@pytest.mark.skipif(sys.platform == "win32", reason="Windows has no SIGTERM to send: terminate() kills")
def test_sigterm_with_a_half_sent_body_exits_0_and_says_what_it_cut(trained_run, tmp_path):
    server = Server(
        trained_run.adapter_dir, tmp_path / "cut.log", "--drain-timeout", "1", "--body-timeout", "60"
    )
    try:
        server.wait_ready()
        sock = _raw(server, b"POST /get_reward HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                    b"content-length: 1000\r\n\r\n{\"query\": [")  # fmt: skip
        time.sleep(0.5)  # the request is in: its handler waits for the rest of the body
        start = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=30) == 0, server.output()
        assert time.monotonic() - start < 10
        assert "cut 1 request(s) in flight" in server.output(), server.output()
        sock.close()
        _no_traceback(server)
    finally:
        server.stop()


def test_guards_refuse_what_cannot_work():
    from lora_rm.errors import UserError
    from lora_rm.serving.guard import Guards, fd_limit

    with pytest.raises(UserError, match="--header-timeout: must be > 0"):
        Guards(header_timeout=0)
    if fd_limit():
        with pytest.raises(UserError, match="below the open-file limit"):
            Guards(max_connections=fd_limit())
        assert Guards().max_connections < fd_limit()


def test_throttled_log_keeps_five_lines_a_window_then_counts(caplog):
    import logging

    from lora_rm.serving.guard import ThrottledLog

    throttle = ThrottledLog(logging.getLogger("test-throttle"), burst=5, window=60)
    with caplog.at_level(logging.WARNING, logger="test-throttle"):
        for i in range(100):
            throttle("slow", f"event {i}")
        throttle("other", "another kind")
        throttle.flush()
    assert [r.getMessage() for r in caplog.records] == [
        *(f"event {i}" for i in range(5)),
        "another kind",
        "(95 more slow events not logged)",
    ]
