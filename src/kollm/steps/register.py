"""`register`: put the model into the MLflow Model Registry with its lineage, and point an alias at it.

    - kind: register
      config:
        name: korean-quickstart   # default: the project name
        alias: challenger         # default; promote it with `kollm registry promote NAME`

The model is logged as one MLflow logged model of the step's run (named `model`) with two flavors over one copy
of the Hugging Face folder: kollm's pyfunc (the folder is its artifact `hf_model`) and `transformers`
(text-generation), with a signature and an input example. It loads with
`mlflow.pyfunc.load_model("models:/NAME@challenger")` or `mlflow.transformers.load_model(...)` in plain MLflow,
serves with `mlflow models serve`, and with `kollm serve models:/NAME@challenger`. The new version carries tags
that lead back to everything it came from:

    kollm.pipeline_run_id, kollm.step_run_id, kollm.step_runs     MLflow runs of the pipeline and each step
    kollm.data.<STEP>.<OUTPUT>                                    content digests of the prepared datasets
    kollm.source.<STEP>.<INPUT>                                   digests of the raw data those steps read
    kollm.model_digest, kollm.base_model                          the model artifact and what it started from
    kollm.base_model_digest, kollm.base_model_path                a LoRA adapter's base (the version holds the
    kollm.base_model_uri                                          adapter only; the registered base, if any)
    kollm.metric.<NAME>, kollm.gate, kollm.gate.reasons           the evaluation and the gate decision

With a `metrics` input (default: the latest evaluate step) a failed gate refuses to register (GateFailed).
Aliases only; MLflow's deprecated stages are never used.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, Field, field_validator

from kollm import adapter
from kollm._pydantic import mlflow_name
from kollm.errors import GateFailed
from kollm.pipeline.step import DATASET_TYPES, STRICT, InputSpec, StepContext, StepResult

KIND = "register"
TRAINING_KINDS = ("cpt", "sft", "align")


class Config(BaseModel):
    model_config = STRICT
    name: str | None = Field(None, description="Registered model name. Default: the project name.")
    alias: str | None = Field("challenger", description="Alias to point at the new version (null: none).")
    description: str = Field("", description="Description stored on the model version.")
    tags: dict[str, str] = Field(default_factory=dict, description="Extra tags for the model version.")

    _model_name = field_validator("name")(mlflow_name)

    @field_validator("alias")
    @classmethod
    def _alias_name(cls, v: str | None) -> str | None:
        if v is not None and (not v or not v.replace("_", "").replace("-", "").isalnum() or v.isdigit()):
            raise ValueError(f'"{v}" is not a valid alias; use letters, digits, - and _ (e.g. challenger)')
        return v


def inputs(config: Config) -> dict[str, InputSpec]:
    return {
        "model": InputSpec(("model",), help="The model to register (default: the latest model)."),
        "metrics": InputSpec(
            ("metrics",), optional=True, help="The evaluation (metrics.json) whose gate must have passed."
        ),
    }


def outputs(config: Config) -> dict[str, str]:
    return {"registration": "report"}


def code(config: Config) -> tuple[str, ...]:
    return ("kollm.steps.register", "kollm.registry", "kollm.eval.pyfunc_hf")


def references(config: Config, project_dir: Path) -> dict[str, str]:
    return {}  # nothing outside its inputs, config and code


RUN_TAGS = ("kollm.pipeline_run_id", "kollm.step_run_id", "kollm.step_runs")  # lineage tags that name MLflow runs


def lineage_tags(ctx: StepContext) -> dict[str, str]:
    """Tags that trace a version back to its pipeline run, step runs, datasets, base model and evaluation."""
    from kollm import registry

    model = ctx.inputs["model"]
    tags = {
        "kollm.pipeline_run_id": ctx.run_id or "",
        "kollm.step_run_id": ctx.tracker.run_id or "",
        "kollm.step_runs": json.dumps({r.name: r.run_id for r in sorted(ctx.upstream, key=lambda r: r.name)}),
        "kollm.model_digest": model.digest,
    }
    datasets = {}
    c = registry.client(ctx.project_dir)
    for record in ctx.upstream:
        if record.kind != "prepare":
            continue
        if record.run_id:  # the raw sources the prepare step read (the runner tags each input's digest)
            for key, value in c.get_run(record.run_id).data.tags.items():
                if key.startswith("kollm.input.") and key.endswith(".digest"):
                    tags[f"kollm.source.{record.name}.{key.removeprefix('kollm.input.').removesuffix('.digest')}"] = (
                        value
                    )
        for out, artifact in record.outputs.items():
            if artifact.type in DATASET_TYPES:
                tags[f"kollm.data.{record.name}.{out}"] = artifact.digest
                datasets[f"{record.name}.{out}"] = {"type": artifact.type, "digest": artifact.digest}
    tags["kollm.data"] = json.dumps(datasets, sort_keys=True)
    bases = [
        r.outputs[o].meta.get("base_model")
        for r in ctx.upstream
        if r.kind in TRAINING_KINDS
        for o in r.outputs
        if r.outputs[o].type == "model"
    ]
    base = next((b for b in bases if b), None) or _kollm_json(model.path).get("base_model")
    if isinstance(base, dict):
        base = base.get("source") or json.dumps(base)
    tags["kollm.base_model"] = str(base or "unknown")
    lora = _kollm_json(model.path).get("lora") or {}
    if lora.get("merged") is False and lora.get("base"):  # an adapter: the version is it and its base's digest
        ref = lora["base"]
        tags[adapter.BASE_DIGEST_TAG] = str(ref.get("digest"))
        tags["kollm.base_model_path"] = str(ref.get("path"))
        known = adapter._registered_with_digest(str(ref.get("digest")), ctx.project_dir)
        if known:
            tags[adapter.BASE_URI_TAG] = known
    return tags


def _kollm_json(folder: Path | None) -> dict:
    if folder is None:
        return {}
    try:
        return json.loads((folder / "kollm.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def run(ctx: StepContext) -> StepResult:
    from kollm import registry
    from kollm.config import load_config
    from kollm.pipeline.artifacts import write_json_atomic

    cfg: Config = ctx.config
    name = cfg.name or load_config(ctx.project_dir)[0].project
    tags = lineage_tags(ctx)
    evaluation = ctx.inputs.get("metrics")
    if evaluation is not None:
        doc = json.loads((evaluation.folder() / "metrics.json").read_text(encoding="utf-8"))
        gate = doc.get("gate")
        if gate is not None and not gate["passed"]:
            raise GateFailed(
                "the evaluation's quality gate failed; refusing to register:\n  " + "\n  ".join(gate["reasons"]),
                hint=f"see {evaluation.folder() / 'metrics.json'}",
            )
        for metric, value in (doc.get("metrics") or {}).items():
            tags[f"kollm.metric.{metric}"] = f"{value:.6g}"
        tags["kollm.gate"] = "none" if gate is None else "passed"
        tags["kollm.gate.reasons"] = "\n".join(gate["reasons"]) if gate else ""
        tags["kollm.eval_digest"] = str(doc.get("eval_digest", ""))
    tags.update(cfg.tags)
    version = registry.register_folder(
        name,
        ctx.inputs["model"].folder(),
        run_id=ctx.tracker.run_id,
        tags=tags,
        description=cfg.description,
        alias=cfg.alias,
        reason=f"registered by pipeline run {ctx.run_id} (step {ctx.name})",
        project_dir=ctx.project_dir,
        step_key=ctx.key or None,
    )
    uri = f"models:/{name}@{cfg.alias}" if cfg.alias in version.aliases else version.uri
    ctx.tracker.set_tags(
        {"kollm.registered_model": name, "kollm.registered_version": version.version, "kollm.model_uri": uri}
    )
    if version.run_id == ctx.tracker.run_id:
        ctx.log.info("registered %s version %s (%s)", name, version.version, uri)
    else:
        ctx.log.info("%s version %s has the same model files (%s); no new version", name, version.version, version.uri)
    # registration.json: what was registered, the same bytes wherever the same inputs are registered first (kollm run,
    # kfp.local, a cluster); the MLflow run ids of this registration go to the artifact's metadata (not digested)
    runs = {k: tags[k] for k in RUN_TAGS}
    record = {
        "name": name,
        "version": version.version,
        "alias": cfg.alias,
        "model_uri": uri,
        "version_uri": version.uri,
        "tags": {k: v for k, v in sorted(tags.items()) if k not in RUN_TAGS},
    }
    write_json_atomic(ctx.output_path("registration") / "registration.json", record)
    return StepResult(
        metrics={"registered_version": float(version.version)},
        meta={"registration": {"name": name, "version": version.version, "uri": uri, "runs": runs}},
    )
