"""kollm's app on Ray Serve (builder form) on a local Ray: the same routes, headers and streaming as `kollm serve`."""

from __future__ import annotations

import httpx
import openai
import pytest

from kollm.errors import ConfigError
from kollm.serve.ray_serve import RayServeArgs, build_app

from .conftest import free_port

pytestmark = pytest.mark.timeout(600)


def test_builder_args_are_checked():
    with pytest.raises(ConfigError, match="model_uri"):
        build_app({"served_model_name": "x"})
    with pytest.raises(ConfigError, match="max_batch_size"):
        build_app({"model_uri": "/m", "max_batch_size": "many"})
    with pytest.raises(ConfigError, match="replicas"):
        build_app({"model_uri": "/m", "replicas": 2})  # the key is num_replicas
    # `serve run ... KEY=VALUE` hands every value over as a string
    a = RayServeArgs.model_validate(
        {"model_uri": "/m", "num_replicas": "2", "num_gpus": "0.5", "engine_args": {"enforce_eager": True}}
    )
    assert (a.num_replicas, a.num_gpus, a.backend) == (2, 0.5, "auto")


@pytest.fixture(scope="module")
def ray_app(tiny_model_dir, tmp_path_factory, ray_cluster):
    """Serve on the session's Ray instance (under xdist, this module runs on the worker that holds it)."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    project = tmp_path_factory.mktemp("ray-project")
    app = build_app(
        {
            "model_uri": str(tiny_model_dir),
            "served_model_name": "tiny",
            "project_dir": str(project),
            "backend": "transformers",
            "device": "cpu",
            "num_cpus": 0.5,
            "max_batch_size": 8,
        }
    )
    serve.run(app, name="kollm", route_prefix="/", blocking=False)
    handle = serve.get_app_handle("kollm")  # waits until the app is running
    assert handle is not None
    url = f"http://127.0.0.1:{port}"
    yield url, project
    serve.shutdown()


@pytest.mark.slow(reason="a local Ray and Ray Serve start: about a minute on two cores")
def test_openai_client_through_ray_serve(ray_app):
    url, project = ray_app
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=2, timeout=120)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    msg = [{"role": "user", "content": "서울은 어떤 도시인가요?"}]
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=msg, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    assert raw.headers["x-kollm-model-version"] == "local"
    whole = raw.parse()
    assert whole.usage.completion_tokens == 8
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=msg, max_tokens=8, temperature=0, stream=True, extra_body={"ignore_eos": True}
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=msg, max_tokens=2)
    metrics = httpx.get(url + "/metrics", timeout=30).text
    assert 'kollm_requests_total{endpoint="/v1/chat/completions",model_version="local",status_code="200"}' in metrics
    assert (
        project / ".kollm" / "logs" / "inference" / "inference.jsonl"
    ).is_file()  # the replica logs into the project
