"""kollm's OpenAI server as a Ray Serve application, in Ray Serve's builder form.

    serve run kollm.serve.ray_serve:build_app model_uri=models:/kollm-ko@champion project_dir=/srv/proj num_replicas=2
    serve run kollm.serve.ray_serve:build_app model_uri=/models/ko num_gpus=1      # one GPU per replica (vLLM there)

or from Python: `serve.run(build_app({"model_uri": "..."}))`, or in a RayService's `serveConfigV2` as
`import_path: kollm.serve.ray_serve:build_app` with the same keys under `args`.

Each replica resolves the model URI, loads the engine as `kollm serve` would choose it (`backend: auto`: vLLM
where it imports, else kollm's native engine), and serves kollm's own app (kollm.serve.router.create_app): the
same routes, auth, version header, metrics and logs as `kollm serve`. Ray runs the app's lifespan, so a replica
that stops lets its requests finish and shuts its engine down.

Public API:
    RayServeArgs         the builder's arguments (pydantic; unknown or mistyped keys are a ConfigError)
    build_app(args)      the Ray Serve Application (a deployment of KollmServer)
    KollmServer          the deployment class (one engine per replica)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kollm.errors import ConfigError


class RayServeArgs(BaseModel):
    """What `serve run kollm.serve.ray_serve:build_app KEY=VALUE ...` takes (values arrive as strings; pydantic converts)."""

    model_config = ConfigDict(extra="forbid")
    model_uri: str = Field(
        description="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/PATH or a model folder (on every node)."
    )
    project_dir: Path | None = Field(
        None, description="The kollm project whose registry and logs to use (default: the replica's working folder)."
    )
    served_model_name: str | None = Field(
        None, description="The `model` name clients send (default: the registered name or folder name)."
    )
    api_key: str | None = Field(
        None, description="Require `Authorization: Bearer KEY` on /v1 (default: $KOLLM_API_KEY; unset: no auth)."
    )
    backend: Literal["auto", "transformers", "vllm"] = Field("auto", description="As `kollm serve --backend`.")
    device: str = Field("auto", description="As `kollm serve --device` (the native engine).")
    dtype: str = Field("auto", description="As `kollm serve --dtype`.")
    max_batch_size: int = Field(32, ge=1, description="Most sequences decoded together per replica.")
    context_length: int | None = Field(None, ge=1, description="Cap on prompt + output tokens.")
    engine_args: dict[str, Any] = Field(default_factory=dict, description="vLLM engine arguments (backend vllm).")
    num_replicas: int = Field(1, ge=1, description="Replicas of the deployment.")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (1 to serve on a GPU, with vLLM where installed).")
    max_ongoing_requests: int = Field(256, ge=1, description="Requests Ray Serve sends one replica at a time.")


class KollmServer:
    """One replica: the engine for the model, served by kollm's app (built by `__serve_build_asgi_app__`)."""

    def __init__(self, args: dict[str, Any]):
        from kollm.serve import API_KEY_ENV, describe_model_uri, resolve
        from kollm.serve.engine import load_engine

        a = RayServeArgs.model_validate(args)
        self.name, self.version = describe_model_uri(a.model_uri, a.project_dir)
        self.name = a.served_model_name or self.name
        self.engine = load_engine(
            resolve(a.model_uri, a.project_dir),
            backend=a.backend,
            device=a.device,
            dtype=a.dtype,
            max_batch_size=a.max_batch_size,
            context_length=a.context_length,
            engine_args=a.engine_args,
        )
        self.api_key = a.api_key if a.api_key is not None else os.environ.get(API_KEY_ENV) or None
        self.log_dir = (a.project_dir if a.project_dir is not None else Path.cwd()) / ".kollm" / "logs"

    def __serve_build_asgi_app__(self):
        from kollm.serve.router import create_app

        return create_app(
            self.engine, model_name=self.name, model_version=self.version, api_key=self.api_key, log_dir=self.log_dir
        )


def build_app(args: dict[str, Any]):
    """The Ray Serve application for `args` (see RayServeArgs); what `serve run kollm.serve.ray_serve:build_app` calls."""
    from ray import serve

    try:
        a = RayServeArgs.model_validate(args)
    except ValidationError as e:
        first = e.errors()[0]
        raise ConfigError(f"build_app: {'.'.join(map(str, first['loc'])) or 'args'}: {first['msg']}") from None
    deployment = serve.deployment(
        name="kollm",
        num_replicas=a.num_replicas,
        max_ongoing_requests=a.max_ongoing_requests,
        ray_actor_options={"num_cpus": a.num_cpus, "num_gpus": a.num_gpus},
    )(serve.ingress()(KollmServer))
    return deployment.bind(a.model_dump(mode="json"))
