"""`lora-rm serve`: a real uvicorn process on a free port, a real HTTP client (httpx)."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cli_runner import ROOT, train_env
from conftest import GOOD, PROMPTS

from lora_rm import cli
from lora_rm.errors import UserError
from lora_rm.evaluation.reward_model import RewardModel
from lora_rm.serving.request import Limits, RequestError, request_models, validate_body

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

ANSWERS = [*GOOD, "whatever", "no idea figure it out yourself", "go away ask someone else it is boring"]
TEXTS = [f"{p} {a}" for p in PROMPTS for a in ANSWERS] + [
    " ".join(["question : how do i make a cake ?"] * 12)
]
ROWS = [(p, " " + a) for p in PROMPTS for a in ANSWERS]
MAX_TEXTS, MAX_CHARS = 64, 2000


class Server:
    """`lora-rm serve ... --port 0` in a process of its own, its output in a file (a pipe could fill up).
    One torch thread: on a busy 2-core machine two threads make each forward of the tiny model ~25x slower."""

    def __init__(self, model: Path, log: Path, *flags: str):
        self.log = log
        cmd = [sys.executable, "-m", "lora_rm.cli", "serve", "--model", str(model), "--port", "0", *flags]
        with log.open("w", encoding="utf-8") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=train_env(), stdout=out, stderr=subprocess.STDOUT)
        self.url = ""

    def wait_ready(self, timeout: float = 120) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited {self.proc.returncode}:\n{self.output()}"
            if not self.url and "serving " in self.output():
                self.url = self.output().split(" on ", 1)[1].split()[0]
            if self.url:
                try:
                    if httpx.get(self.url + "/health").status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
            time.sleep(0.1)
        raise AssertionError(f"server not ready after {timeout} s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8")

    def health(self) -> dict:
        return httpx.get(self.url + "/health").json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def servers(trained_run, tmp_path_factory):
    """The trained tiny GPT-2 adapter behind two servers, started together: one for the request tests and
    one to stop with SIGTERM while it is busy (one sequence per forward makes its requests take a second)."""
    tmp = tmp_path_factory.mktemp("serve")
    main = Server(
        trained_run.adapter_dir, tmp / "main.log", "--batch-size", "8", "--max-request-texts", str(MAX_TEXTS),
        "--max-text-chars", str(MAX_CHARS),
    )  # fmt: skip
    drain = Server(trained_run.adapter_dir, tmp / "drain.log", "--batch-size", "1")
    try:
        yield main.wait_ready(), drain.wait_ready()
    finally:
        main.stop()
        drain.stop()


@pytest.fixture(scope="module")
def model(trained_run) -> RewardModel:
    return RewardModel.from_pretrained(trained_run.adapter_dir)


def _close(got: list[float], expected: list[float]) -> bool:
    return len(got) == len(expected) and all(abs(a - b) <= 1e-5 for a, b in zip(got, expected))


def test_get_reward_is_openrlhf_protocol_and_equals_score_texts(servers, model):
    main, _ = servers
    body = {"query": TEXTS, "prompts": ["ignored"] * len(TEXTS), "labels": [""] * len(TEXTS)}
    r = httpx.post(main.url + "/get_reward", json=body)
    assert r.status_code == 200, r.text
    expected = model.score_texts(TEXTS)
    assert _close(r.json()["rewards"], expected) and r.json()["scores"] == r.json()["rewards"]
    assert httpx.post(main.url + "/get_reward", json={"query": []}).json()["rewards"] == []


def test_score_equals_reward_model_score(servers, model):
    main, _ = servers
    r = httpx.post(
        main.url + "/score", json={"prompts": [p for p, _ in ROWS], "responses": [a for _, a in ROWS]}
    )
    assert r.status_code == 200, r.text
    assert _close(r.json()["rewards"], model.score([p for p, _ in ROWS], [a for _, a in ROWS]))


def test_concurrent_clients_are_batched_and_all_answered_right(servers, model):
    main, _ = servers
    by_text = dict(zip(TEXTS, model.score_texts(TEXTS)))
    by_row = dict(zip(ROWS, model.score([p for p, _ in ROWS], [a for _, a in ROWS])))
    before = main.health()
    wrong: list[str] = []

    def client(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=main.url, timeout=60) as http:
            for i in range(50):
                if i % 2:
                    texts = rng.sample(TEXTS, rng.randint(1, 5))
                    got, expected = (
                        http.post("/get_reward", json={"query": texts}),
                        [by_text[t] for t in texts],
                    )
                else:
                    rows = rng.sample(ROWS, rng.randint(1, 5))
                    body = {"prompts": [p for p, _ in rows], "responses": [a for _, a in rows]}
                    got, expected = http.post("/score", json=body), [by_row[r] for r in rows]
                if got.status_code != 200 or not _close(got.json()["rewards"], expected):
                    wrong.append(f"client {seed} request {i}: {got.status_code} {got.text} != {expected}")

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong, "\n".join(wrong[:5])
    after = main.health()
    calls, seqs = (after[k] - before[k] for k in ("model_calls", "sequences_scored"))
    assert seqs >= 400 and calls < 400, f"{calls} model calls for 400 requests: no batching across requests"


BAD_REQUESTS = [
    ("/get_reward", b'{"query": ["unterminated', 400, "not valid JSON"),
    ("/get_reward", b"\xff\xfe not utf-8", 400, "not valid JSON"),
    ("/get_reward", b'["a list"]', 422, "expected a JSON object"),
    ("/get_reward", b'{"queries": ["typo"]}', 422, 'missing field "query"'),
    ("/get_reward", b'{"query": "not a list"}', 422, "expected a list, got str"),
    ("/get_reward", b'{"query": ["fine", 7]}', 422, "query[1]: expected text, got int"),
    ("/get_reward", b'{"query": ["fine", null]}', 422, "query[1]: missing or null"),
    ("/get_reward", b'{"query": ["fine", "  "]}', 422, "query[1]: empty or whitespace-only"),
    ("/get_reward", b'{"query": ["nul \\u0000"]}', 422, "NUL"),
    ("/get_reward", json.dumps({"query": ["x" * (MAX_CHARS + 1)]}).encode(), 413, "--max-text-chars"),
    ("/get_reward", json.dumps({"query": ["a"] * (MAX_TEXTS + 1)}).encode(), 413, "--max-request-texts"),
    ("/score", b'{"prompts": ["q"], "responses": [" a", " b"]}', 422, "1 prompts but 2 responses"),
    ("/score", b'{"prompts": ["q"]}', 422, 'missing field "responses"'),
    ("/score", b'{"prompts": [[{"role": "user", "content": "hi"}]], "responses": [" a"]}', 422, "trained on text"),
    ("/score", json.dumps({"prompts": ["q" * MAX_CHARS], "responses": [" a"]}).encode(), 413, "row 0"),
]  # fmt: skip


def test_every_bad_request_is_refused_with_its_reason_and_the_next_good_one_served(servers, model):
    main, _ = servers
    expected = model.score_texts(TEXTS[:3])
    with httpx.Client(base_url=main.url) as http:
        for path, body, status, reason in BAD_REQUESTS:
            r = http.post(path, content=body, headers={"content-type": "application/json"})
            assert r.status_code == status and reason in r.json()["error"], (body[:60], r.status_code, r.text)
            good = http.post("/get_reward", json={"query": TEXTS[:3]})
            assert good.status_code == 200 and _close(good.json()["rewards"], expected)
        assert http.get("/get_reward").status_code == 405
        assert http.post("/nowhere", json={}).status_code == 404
    assert main.proc.poll() is None


@pytest.mark.skipif(sys.platform == "win32", reason="Windows has no SIGTERM to send: terminate() kills")
def test_sigterm_drains_requests_in_flight_and_exits_0(servers, model):
    _, drain = servers
    texts = [TEXTS[i % len(TEXTS)] for i in range(300)]  # 300 forwards of one: about a second a request
    expected = model.score_texts(texts)
    answers: list = []

    def client() -> None:
        try:
            answers.append(httpx.post(drain.url + "/get_reward", json={"query": texts}, timeout=120))
        except httpx.HTTPError as e:
            answers.append(e)

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while drain.health()["pending_requests"] < 3:  # all three are in the server before the signal
        assert time.monotonic() < deadline, drain.health()
        time.sleep(0.01)
    drain.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join()
    assert drain.proc.wait(timeout=60) == 0, drain.output()
    for r in answers:
        assert isinstance(r, httpx.Response) and r.status_code == 200, r
        assert _close(r.json()["rewards"], expected)
    assert "Shutting down" in drain.output()
    with pytest.raises(httpx.TransportError):
        httpx.get(drain.url + "/health")


def test_missing_extra_names_the_install_command(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # `import fastapi` now raises ImportError
    assert cli.main(["serve", "--model", "runs/none"]) == 2
    err = capsys.readouterr().err
    assert "pip install lora_rm[serve]" in err and "fastapi" in err and "Traceback" not in err


def test_a_taken_port_is_a_user_error():
    from lora_rm.serving.guard import listen_socket

    with listen_socket("127.0.0.1", 0) as taken:
        taken.listen()
        with pytest.raises(UserError, match="cannot listen on 127.0.0.1"):
            listen_socket("127.0.0.1", taken.getsockname()[1])


class ChatStub:
    """What the app needs of a RewardModel trained on chat messages: it records what it was asked."""

    data_format, path = "conversational", None

    def __init__(self):
        self.calls: list = []

    def score(self, prompts, responses, batch_size, normalize):
        self.calls.append((prompts, responses))
        return [float(len(p)) for p in prompts]


def test_chat_prompts_go_to_the_model_as_message_lists():
    from fastapi.testclient import TestClient

    from lora_rm.serving.server import build_app

    stub = ChatStub()
    one = [{"role": "user", "content": "hi"}]
    two = [*one, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and?"}]
    with TestClient(build_app(stub)) as http:
        r = http.post("/score", json={"prompts": [one, two], "responses": ["a", "b"]})
        assert r.json() == {"rewards": [1.0, 3.0]} and stub.calls == [([one, two], ["a", "b"])]
        r = http.post("/score", json={"prompts": ["text"], "responses": ["a"]})
        assert r.status_code == 422 and "trained on chat messages" in r.json()["error"]
        r = http.post("/score", json={"prompts": [[{"role": "robot", "content": "x"}]], "responses": ["a"]})
        assert r.status_code == 422 and "unknown role" in r.json()["error"]
        escape = [{"role": "user", "content": "hi \x1b[1m there"}]  # control characters are text
        assert http.post("/score", json={"prompts": [escape], "responses": ["a \x0c b"]}).status_code == 200


@pytest.mark.integration
def test_the_benchmark_runs_smoke_sized(trained_run):
    bench = subprocess.run(
        [sys.executable, "benchmarks/serve.py", "--smoke", "--model", str(trained_run.merged_dir)],
        cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bench.returncode == 0, bench.stdout + bench.stderr
    assert "| lora-rm serve | 4 |" in bench.stdout and "| naive pipeline | 4 |" in bench.stdout


def test_the_request_models_refuse_as_the_server_answers():
    """The bodies' pydantic models without a server: too many items is a 413 before any item is read, the first
    three bad items are named (then how many more), a field missing or not a list is named, the prompts come
    before the responses, other fields are ignored and control characters are text."""
    reward, score = request_models(Limits(max_request_texts=4))

    def refusal(model, body) -> tuple[int, str]:
        with pytest.raises(RequestError) as e:
            validate_body(model, body)
        return e.value.status, str(e.value)

    assert refusal(reward, {"query": [1, 2, 3, 4, 5]}) == (
        413,
        '"query": 5 items, more than --max-request-texts 4',
    )
    assert refusal(reward, {"query": [1, None, " ", "\x00"]}) == (
        422,
        "query[0]: expected text, got int; query[1]: missing or null; query[2]: empty or whitespace-only text "
        "(and 1 more)",
    )
    assert refusal(reward, {"query": {"a": 1}}) == (422, '"query": expected a list, got dict')
    assert refusal(reward, {"queries": []}) == (422, 'missing field "query"')
    assert refusal(score, {"prompts": [7], "responses": 3}) == (422, "prompts[0]: expected text, got int")
    assert refusal(score, {"prompts": ["q"], "responses": [" a", " b"]}) == (422, "1 prompts but 2 responses")
    assert validate_body(reward, {"query": ["\x01 bytes \x7f"], "prompts": 5, "labels": None}).query == [
        "\x01 bytes \x7f"
    ]
