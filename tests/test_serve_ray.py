"""The Ray Serve deployment (gpt2fast.serve.ray_deployment) on a local Ray cluster on loopback: two replicas,
the openai client through Ray's HTTP proxy.  Skipped where Ray is not installed (it is not in the dev extra:
``make test-ray`` installs the ``ray`` extra beside the venv and runs this file)."""

from __future__ import annotations

import socket

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def url():
    from gpt2fast.serve.ray_deployment import deployment

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    port = _free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = deployment(num_replicas=2, ray_actor_options={"num_cpus": 0.5}).bind(random="tiny", max_batch=4)
        serve.run(app, name="gpt2fast", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_serve_completions_through_the_proxy(url):
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    kw = dict(model="tiny", prompt="Replicas", max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    texts = {client.completions.create(**kw).choices[0].text for _ in range(6)}
    assert len(texts) == 1  # same weights (init seed) on both replicas: one greedy continuation
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == texts.pop()
    r = httpx.post(url + "/v1/completions", json={"model": "other", "prompt": "x"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
