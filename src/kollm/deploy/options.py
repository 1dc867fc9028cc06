"""What a rendering needs besides kollm.yaml: the image, the store, the names of Secrets, the rollout settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kollm.errors import ConfigError
from kollm.pipeline.spec import Pipeline, load_pipeline
from kollm.rollout.analysis import (
    DEFAULT_ANALYSIS,
    DEFAULT_FAILURE_LIMIT,
    DEFAULT_PAUSE,
    DEFAULT_STEPS,
    Criterion,
    parse_analysis,
)
from kollm.rollout.state import parse_duration, parse_steps

TRAINING_KINDS = ("cpt", "sft", "align")


@dataclass(frozen=True)
class DeployOptions:
    """Settings of the rendered files. Every Secret is referenced by name; no secret value is ever rendered."""

    image: str = "ghcr.io/kollm/kollm:0.1.0"
    store: str = ""  # default: s3://kollm/<project>
    bucket: str = "kollm"
    model_alias: str = "champion"
    canary_alias: str = "challenger"
    serve_gpus: int = 0
    serve_replicas: int = 5  # 5 replicas let a replica-based canary hit 20/40/60/80 % exactly
    steps: str = DEFAULT_STEPS
    pause: str = DEFAULT_PAUSE
    analysis: str = DEFAULT_ANALYSIS
    failure_limit: int = DEFAULT_FAILURE_LIMIT
    s3_secret: str = "kollm-s3"  # keys AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
    mlflow_db_secret: str = "kollm-mlflow-db"  # key uri: postgresql://USER:PASSWORD@HOST:5432/mlflow
    api_key_secret: str = "kollm-api-key"  # key KOLLM_API_KEY (optional in the pods)
    s3_endpoint: str = ""  # S3-compatible endpoint (MinIO); empty: AWS S3
    prometheus_url: str = "http://prometheus.monitoring.svc:9090"
    model_version: str = "1"  # kserve: the registered version the InferenceService serves
    canary_version: str = "2"  # kserve: the version inferenceservice-canary.yaml serves as the canary
    llm_model_uri: str = (
        ""  # kserve: the model folder the LLMInferenceService loads; default s3://BUCKET/PROJECT/hf/champion
    )


@dataclass(frozen=True)
class Project:
    """The parts of a pipeline the renderers use, checked once."""

    pipeline: Pipeline
    options: DeployOptions
    weights: list[float] = field(default_factory=list)
    pause_s: float = 120.0
    criteria: list[Criterion] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.pipeline.cfg.project

    @property
    def slug(self) -> str:
        """The project name as a Kubernetes object name (RFC 1123: lower case, digits, '-')."""
        out = "".join(c if c.isalnum() and c.isascii() else "-" for c in self.name.lower()).strip("-")
        return out or "kollm"

    @property
    def store(self) -> str:
        return self.options.store or f"s3://{self.options.bucket}/{self.slug}"

    @property
    def config_text(self) -> str:
        return self.pipeline.file.read_text(encoding="utf-8")

    def model_uri(self, alias: str) -> str:
        return f"models:/{self.name}@{alias}"

    @property
    def llm_model_uri(self) -> str:
        return self.options.llm_model_uri or f"s3://{self.options.bucket}/{self.slug}/hf/{self.options.model_alias}"

    @property
    def backend(self) -> str:
        """What `kollm serve --backend auto` picks: vLLM on a GPU where installed, else transformers."""
        return "auto" if self.options.serve_gpus > 0 else "transformers"


def load_project(path: str | Path | None, options: DeployOptions) -> Project:
    """Load and wire kollm.yaml and check the options. Raises ConfigError naming what to fix."""
    pipe = load_pipeline(path)
    problems = []
    try:
        weights = parse_steps(options.steps)
    except ConfigError as e:
        problems.extend(e.problems)
        weights = []
    try:
        pause_s = parse_duration(options.pause)
    except ConfigError as e:
        problems.extend(e.problems)
        pause_s = 0.0
    try:
        criteria = parse_analysis(options.analysis)
    except ConfigError as e:
        problems.extend(e.problems)
        criteria = []
    if weights and (any(not 0 < w < 100 or w != int(w) for w in weights) or weights != sorted(set(weights))):
        problems.append(
            f"--steps: {options.steps!r}; give increasing whole percentages between 0 and 100, e.g. 20,40,60,80"
        )
    for c in criteria:
        if c.metric in ("probe_pass_rate", "judge_win_rate"):
            problems.append(
                f"--analysis: {c.metric} needs kollm's gateway (its probe or judge); Prometheus has no such metric"
            )
    if not options.store and not options.bucket:
        problems.append("--bucket: empty; name the S3 bucket (or give --store s3://BUCKET/PREFIX)")
    for flag, version in (("--model-version", options.model_version), ("--canary-version", options.canary_version)):
        if not version.isdigit():
            problems.append(f"{flag}: {version!r}; give a registered model version number, e.g. 3")
    if options.serve_replicas < 1:
        problems.append("--replicas: must be at least 1")
    if problems:
        raise ConfigError(problems)
    return Project(pipe, options, weights, pause_s, criteria)
