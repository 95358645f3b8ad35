"""`tongyi-local serve` in a real subprocess on 127.0.0.1, used by the official openai SDK."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

ASK = [{"role": "user", "content": "What is the capital of France?"}]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, chat_role_config):
    root = tmp_path_factory.mktemp("serve")
    config = chat_role_config
    port = _free_port()
    env = dict(os.environ, SERVE_TEST_KEY="sekrit-key", TONGYI_LOCAL_HOME=str(root / "home"))
    env.pop("TONGYI_LOCAL_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "tongyi_local", "serve", "--port", str(port),
                             "--config", str(config), "--api-key-env", "SERVE_TEST_KEY"],
                            env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"serve did not come up: {proc.communicate()}")
        time.sleep(0.2)
    yield base, proc
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("serve did not stop on Ctrl-C")


def _client(base: str, key: str = "sekrit-key") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)


def test_the_sdk_chats_and_streams_over_http(server):
    base, _ = server
    client = _client(base)
    done = client.chat.completions.create(model="coder", messages=ASK, max_tokens=24)
    assert "Paris" in done.choices[0].message.content
    chunks = list(client.chat.completions.create(model="coder", messages=ASK, max_tokens=24,
                                                 stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == done.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == done.usage.completion_tokens
    assert [m.id for m in client.models.list()] == ["coder", "chat"] or "coder" in [
        m.id for m in client.models.list()]


def test_key_is_required_except_for_health(server):
    base, _ = server
    with pytest.raises(openai.AuthenticationError):
        _client(base, key="wrong").models.list()
    assert httpx.get(f"{base}/v1/models").status_code == 401
    assert httpx.get(f"{base}/health").json()["status"] == "ok"


def test_errors_keep_their_status_over_http(server):
    base, _ = server
    with pytest.raises(openai.NotFoundError):
        _client(base).chat.completions.create(model="nope", messages=ASK)
    with pytest.raises(openai.BadRequestError) as overflow:
        _client(base).chat.completions.create(model="coder", max_tokens=8, messages=[
            {"role": "user", "content": "word " * 3000}])
    assert overflow.value.code == "context_length_exceeded"


def test_a_client_that_disconnects_mid_stream_does_not_hold_the_model(server):
    base, _ = server
    client = _client(base)
    for _ in range(3):  # more abandoned streams than the model has slots
        stream = client.chat.completions.create(model="coder", messages=ASK, max_tokens=1000,
                                                stream=True, extra_body={"ignore_eos": True})
        next(iter(stream))
        stream.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _in_flight(base):
        time.sleep(0.1)
    assert _in_flight(base) == 0, "abandoned streams are still being generated"
    done = client.chat.completions.create(model="coder", messages=ASK, max_tokens=8)
    assert done.choices[0].message.content


def _in_flight(base: str) -> int:
    models = httpx.get(f"{base}/health").json()["models"]
    assert models, "the model should be loaded by now"
    return sum(m["in_flight"] for m in models)


def test_serve_says_where_it_listens_and_refuses_an_empty_key_variable(server, tmp_path):
    _, proc = server
    env = dict(os.environ, EMPTY_KEY="")
    bad = subprocess.run([sys.executable, "-m", "tongyi_local", "serve", "--port", "1",
                          "--api-key-env", "EMPTY_KEY"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 1 and "EMPTY_KEY" in bad.stderr and "Traceback" not in bad.stderr
