"""The `kollm` command line: a thin typer app; each command calls one library function."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kollm.errors import KollmError
from kollm.redact import mask_text
from kollm.rollout.analysis import (
    DEFAULT_ANALYSIS,
    DEFAULT_FAILURE_LIMIT,
    DEFAULT_MIN_REQUESTS,
    DEFAULT_PAUSE,
    DEFAULT_STEPS,
)

if TYPE_CHECKING:
    from kollm.pipeline.history import StepRow

app = typer.Typer(
    help="kollm: Korean corpus -> trained, evaluated, registered, served and rolled-out LLM.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
step_app = typer.Typer(
    help="Run single steps, one process each (the building block for distributed executors).", no_args_is_help=True
)
app.add_typer(step_app, name="step")
out = Console()
err = Console(stderr=True)
T = TypeVar("T")

PathArg = Annotated[
    Optional[Path], typer.Argument(help="kollm.yaml or the folder that holds it (default: the current folder).")
]
ProjectOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--project",
        help="Project folder whose tracking and registry settings to use (default: the current folder if it holds kollm.yaml).",
    ),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or step lines.")]


def _version_callback(value: bool) -> None:
    if value:
        from kollm._version import __version__

        print(f"kollm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", help="Print kollm's version and exit.", callback=_version_callback, is_eager=True),
    ] = False,
) -> None:
    """kollm: Korean corpus -> trained, evaluated, registered, served and rolled-out LLM."""


# Tables (`runs`, `show`, a sweep's trials, `validate`, `registry list|show`, `monitor drift`) fit the terminal's
# width (80 columns when piped) without breaking a word: ids are cut to one line, words wrap at their boundaries,
# and a word or value too long for its column ends in an ellipsis. The full values are in each command's --json.


def new_table(title: str | None = None, **kwargs: Any) -> Table:
    """A compact table: a rule under the header and no side borders (more room for the values at 80 columns)."""
    from rich import box

    return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, **kwargs)


def id_column(table: Table, header: str, width: int = 12) -> None:
    """A column of ids or digests: one line, shortened with an ellipsis (the full value is in `--json`)."""
    table.add_column(header, no_wrap=True, overflow="ellipsis", max_width=width)


def text_column(table: Table, header: str, *, min_width: int | None = None, max_width: int | None = None) -> None:
    """A column of words: wrapped at word boundaries, never inside a word; a word wider than the column is cut
    with an ellipsis. It is never narrower than its header's longest word (or `min_width`)."""
    widest = max((len(w) for w in header.split()), default=0)
    table.add_column(header, overflow="ellipsis", min_width=max(widest, min_width or 0), max_width=max_width)


def clip(text: str, limit: int) -> str:
    """At most `limit` characters; a longer value ends in an ellipsis (so a cell stays a few lines)."""
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    at = max(cut.rfind(", "), cut.rfind("; "))
    return (cut[:at] if at > limit // 2 else cut).rstrip(" ,;") + " …"


def print_table(table: Table) -> None:
    """Print at the current width ($COLUMNS, else the terminal's, else 80)."""
    Console().print(table)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, ensure_ascii=False, indent=2, default=str))


def project_dir(project: Path | None) -> Path | None:
    """The project folder for commands that use a project's tracking/registry settings."""
    if project is not None:
        if not (project / "kollm.yaml").exists():
            raise KollmError(f"--project {project}: no kollm.yaml there")
        return project.resolve()
    return Path.cwd() if (Path.cwd() / "kollm.yaml").exists() else None


@app.command()
def init(
    dest: Annotated[Path, typer.Argument(help="Folder to create the project in.")],
    example: Annotated[str, typer.Option(help="Which example project to start from.")] = "korean-quickstart",
    ci: Annotated[
        Optional[str],
        typer.Option(
            help="Also write a CI workflow: github (.github/workflows/kollm.yml, as `kollm deploy render --target github`)."
        ),
    ] = None,
) -> None:
    """Create a runnable example project (its data is generated or read from installed packages)."""
    from kollm.examples import init_project

    path = init_project(dest, example, ci=ci)
    out.print(f"[green]created[/] {path}  —  next: [bold]cd {dest} && kollm run[/]")


def plural(n: int, word: str) -> str:
    """'1 step', '2 steps'."""
    return f"{n} {word}{'' if n == 1 else 's'}"


@app.command()
def validate(
    path: PathArg = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help="Print the wiring as JSON: {project, file, steps: [{index, name, kind, inputs, outputs}]}."
        ),
    ] = False,
) -> None:
    """Check kollm.yaml: fields, step configs, data files and the wiring of inputs."""
    from kollm.pipeline.spec import load_pipeline

    pipe = load_pipeline(path)
    check_offline_models(pipe)
    check_gate_metrics(pipe)
    if as_json:
        steps = [
            {
                "index": s.index,
                "name": s.name,
                "kind": s.kind,
                "inputs": {k: str(v) for k, v in s.inputs.items()},
                "outputs": dict(s.outputs),
            }
            for s in pipe.steps
        ]
        _print_json({"project": pipe.cfg.project, "file": str(pipe.file), "steps": steps})
        return
    table = new_table(f"{pipe.cfg.project}: {plural(len(pipe.steps), 'step')}")
    for col in ("#", "step", "kind", "inputs", "outputs"):
        text_column(table, col)
    for s in pipe.steps:
        ins = ", ".join(f"{k} <- {v}" for k, v in s.inputs.items())
        outs = ", ".join(f"{k}: {v}" for k, v in s.outputs.items())
        table.add_row(str(s.index), escape(s.name), s.kind, escape(clip(ins, 160)), escape(clip(outs, 160)))
    print_table(table)
    out.print(f"[green]ok[/] {pipe.file}")


def check_gate_metrics(pipe: Any) -> None:
    """Each `evaluate` step's gate rules against the metrics it will produce (evaluate's own check, run now instead
    of after the model is loaded). Checked where the suite is a data source; a suite from an earlier step is
    checked when the step runs."""
    from kollm.eval.gate import parse_rule
    from kollm.pipeline.spec import resolve_source
    from kollm.steps import evaluate

    for s in pipe.steps:
        if s.kind != "evaluate" or not s.config.gate:
            continue
        cases: list[Any] = []
        if s.config.generation:
            suite = s.inputs.get("suite")
            if suite is None or suite.source is None:
                continue
            src = pipe.cfg.data[suite.source]
            artifact = resolve_source(suite.source, src, pipe.project_dir, digest=False)
            cases = evaluate._load_cases(evaluate._suite_files(artifact), s.config.generation.limit)
        has_data = bool(s.config.perplexity and s.inputs.get("data") is not None)
        produced = evaluate._expected_metrics(s.config, has_data, cases, pipe.project_dir)
        evaluate._check_rules(s.name, [parse_rule(r) for r in s.config.gate], produced)


def check_offline_models(pipe: Any) -> None:
    """With HF_HUB_OFFLINE set, a `base_model` that is neither `scratch`, a local folder nor in the local Hugging
    Face cache cannot load: say so now rather than after minutes of retries in `kollm run`."""
    from kollm.errors import ConfigError

    if os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("1", "true", "yes", "on"):
        return
    from kollm.train.config import hub_revision

    problems = []
    for s in pipe.steps:
        base = getattr(s.config, "base_model", None)
        if not isinstance(base, str) or base == "scratch" or (pipe.file.parent / base).is_dir():
            continue
        if hub_revision(base) is None:
            problems.append(
                f"steps.{s.name}.config.base_model: '{base}' is not a local folder and not in the local Hugging Face "
                "cache, and HF_HUB_OFFLINE is set, so it cannot be downloaded"
            )
    if problems:
        raise ConfigError(
            problems,
            source=str(pipe.file),
            hint="use `base_model: scratch`, a local model folder, or unset HF_HUB_OFFLINE on a machine that reaches the hub",
        )


@app.command("run")
def run_cmd(
    path: PathArg = None,
    from_step: Annotated[
        Optional[str], typer.Option("--from", help="Reuse cached steps before STEP; re-run it and all later steps.")
    ] = None,
    only: Annotated[
        Optional[str],
        typer.Option("--only", help="Run only STEP (earlier steps must be cached; add --force STEP to recompute it)."),
    ] = None,
    force: Annotated[
        Optional[list[str]], typer.Option("--force", help="Re-run STEP even if cached (repeatable).")
    ] = None,
    executor: Annotated[
        Optional[str], typer.Option(help="Executor: local or ray (default: kollm.yaml's `executor`, else local).")
    ] = None,
    address: Annotated[
        Optional[str],
        typer.Option(help="Ray only: the cluster address (auto, ray://HOST:10001); default: a local Ray instance."),
    ] = None,
    store: Annotated[
        Optional[str],
        typer.Option(
            help="Artifact store: a folder or fsspec URL (file://, s3://...). Default: the project's .kollm/."
        ),
    ] = None,
    quiet: QuietOpt = False,
) -> None:
    """Run the pipeline. Finished steps whose config, inputs and code are unchanged are reused."""
    from kollm.executors import run

    show = not quiet
    t0 = time.perf_counter()
    result = run(
        path,
        force=force or (),
        from_step=from_step,
        only=only,
        executor=executor,
        address=address,
        store=store,
        report=_step_lines(show),
        progress=_progress(show),
    )
    hits = sum(r.cache_hit for r in result.steps.values())
    if show:
        err.print(
            f"[bold green]done[/] run {result.run_id} — {plural(len(result.steps), 'step')}, {hits} cached, {time.perf_counter() - t0:.1f}s"
        )
        summary = run_summary(result.steps.values())
        if summary:
            err.print(f"[bold]summary:[/] {escape(summary)}", highlight=False)
    else:
        print(result.run_id)


def run_summary(records: Iterable[Any]) -> str:
    """One line on what the run decided: each evaluate step's gate verdict and each registered version and alias
    ("" when the pipeline has neither)."""
    parts = []
    for r in records:
        if r.kind == "evaluate":
            passed = r.metrics.get("gate_passed")
            verdict = "no gate" if passed is None else ("gate passed" if passed else "gate FAILED")
            parts.append(f"{r.name}: {verdict}")
        elif r.kind == "register":
            reg = next((a.meta for a in r.outputs.values() if a.meta.get("version") is not None), None)
            if reg:
                parts.append(f"{r.name}: registered {reg.get('name')} version {reg['version']} as {reg.get('uri')}")
    return "; ".join(parts)


def _step_lines(show: bool):
    """The runner's events as one line each on stderr."""

    def report(event: str, step: str, detail: dict[str, Any]) -> None:
        if not show:
            return
        if event == "started":
            err.print(f"[cyan]▶[/] {step} [dim]{detail['key'][:12]}[/]")
        elif event == "cached":
            err.print(f"[green]✓[/] {step} [dim](cached, {detail['duration_s']:.2f}s)[/]")
        elif event == "finished":
            err.print(f"[green]✓[/] {step} [dim]({finished_note(detail)})[/]")
        elif event == "waiting":
            err.print(f"[yellow]…[/] {step}: another kollm process is computing it; waiting to reuse its result")
        elif event == "retry":
            err.print(
                f"[yellow]↻[/] {step}: attempt {detail['attempt']} in {detail['delay_s']:.1f}s after {detail['error']}"
            )
        elif event == "failed":
            err.print(f"[red]✗[/] {step}")

    return report


def finished_note(detail: dict[str, Any]) -> str:
    """A finished step's time, and for a training step its final loss and the checkpoint it resumed from."""
    metrics = detail.get("metrics") or {}
    parts = [f"{detail['duration_s']:.1f}s"]
    if isinstance(metrics.get("train_loss"), (int, float)):
        parts.append(f"loss {metrics['train_loss']:.4g}")
    if isinstance(metrics.get("resumed_from_step"), (int, float)):
        parts.append(f"resumed from the checkpoint at step {int(metrics['resumed_from_step'])}")
    return ", ".join(parts)


def _progress(enabled: bool):
    """ctx.progress for steps: rich progress bars on a terminal (done/total, elapsed time, a training step's
    latest loss; bars of steps in child processes too), nothing otherwise."""
    from kollm.pipeline.progress import TerminalBars
    from kollm.pipeline.step import _no_progress

    return TerminalBars(err) if enabled and err.is_terminal else _no_progress


@app.command()
def runs(
    path: PathArg = None,
    limit: Annotated[int, typer.Option(help="How many runs to list.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (full run ids).")] = False,
) -> None:
    """List pipeline runs (newest first)."""

    from kollm.pipeline.history import list_runs

    rows = list_runs(path, limit=limit)
    if as_json:
        _print_json([r.to_json() for r in rows])
        return
    if not rows:
        out.print("no runs yet — `kollm run` starts one")
        return
    print_table(runs_table(rows))


def runs_table(rows: list[Any]) -> Table:
    table = new_table()
    id_column(table, "run")
    for col in ("started", "status", "steps", "cached", "duration"):
        text_column(table, col)
    for r in rows:
        table.add_row(r.run_id, r.started, r.status, str(r.steps), str(r.cache_hits), r.duration)
    return table


@app.command()
def show(
    run_id: Annotated[str, typer.Argument(help="A run id (or a unique prefix), or 'latest'.")],
    path: Annotated[
        Optional[Path], typer.Option("--path", help="kollm.yaml or its folder (default: current folder).")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the run, its steps and any sweep's trials as JSON.")
    ] = False,
) -> None:
    """Show one pipeline run: its steps, cache hits, durations, keys, digests and metrics; a sweep's trials sorted by its metric."""

    from kollm.pipeline.history import show_run

    info, steps = show_run(path, run_id)
    if as_json:
        _print_json({"run": info.to_json(), "steps": [s.to_json() for s in steps]})
        return
    out.print(f"[bold]{info.run_id}[/]  {info.status}  started {info.started}  {info.duration}", soft_wrap=True)
    print_table(steps_table(steps))
    for s in steps:
        if s.trials:
            print_table(trials_table(s))


def steps_table(steps: list[StepRow]) -> Table:
    """One row per step; outputs and metrics cut to a few lines (all of them: `show --json`)."""
    table = new_table()
    for col in ("step", "kind", "status", "cache", "duration"):
        text_column(table, col)
    id_column(table, "key", 8)
    for col in ("outputs", "metrics"):
        text_column(table, col)
    for s in steps:
        table.add_row(
            escape(s.name),
            s.kind,
            s.status,
            s.cache,
            s.duration,
            s.key,
            escape(clip(s.outputs, 90)),
            clip(s.metrics, 90),
        )
    return table


def trials_table(s: StepRow) -> Table:
    """A sweep's trials, best first (the order the sweep recorded them in)."""
    table = new_table(f"sweep of {s.name}: {len(s.trials)} trials by {s.sweep_metric}")
    for col in ("trial", "status", "metric", "values", "reports"):
        text_column(table, col)
    id_column(table, "key", 8)
    id_column(table, "run", 8)
    for t in s.trials:
        metric = f"{t['metric']:.4g}" if isinstance(t.get("metric"), (int, float)) else "-"
        values = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.get("values", {}).items()
        )
        table.add_row(
            str(t.get("trial")),
            str(t.get("status")) + (" (cached)" if t.get("cached") else ""),
            metric,
            escape(clip(values, 90)),
            str(t.get("iterations", "")),
            str(t.get("key", "")),
            str(t.get("run_id") or ""),
        )
    return table


@app.command()
def schema() -> None:
    """Print the JSON Schema of kollm.yaml (for editor completion)."""
    from kollm.pipeline.schema import json_schema

    print(json.dumps(json_schema(), indent=2, ensure_ascii=False))


@step_app.command("run")
def step_run(
    step: Annotated[str, typer.Option("--step", help="The step to run.")],
    path: PathArg = None,
    inputs: Annotated[
        Optional[list[str]],
        typer.Option(
            "--input",
            help="NAME=URI: an input artifact (an output folder URI printed by an earlier `kollm step run`). Repeatable. Inputs not given come from data sources or the cache.",
        ),
    ] = None,
    store: Annotated[
        Optional[str],
        typer.Option(
            help="Artifact store: a folder or fsspec URL (file://, s3://...). Default: the project's .kollm/."
        ),
    ] = None,
    attempt: Annotated[
        int, typer.Option(help="Which attempt this is (0 = the first); recorded with the step's run.", min=0)
    ] = 0,
    parent_run_id: Annotated[Optional[str], typer.Option(help="Attach to this pipeline MLflow run.")] = None,
    outputs_json: Annotated[
        Optional[Path],
        typer.Option(help="Also write the result JSON (key, cache_hit, outputs with URIs and digests) to this file."),
    ] = None,
    force: Annotated[bool, typer.Option(help="Re-run even if cached.")] = False,
    overrides_json: Annotated[
        Optional[str],
        typer.Option(help='Config overrides as JSON: {"STEP.path": value} (what a sweep trial sets).', hidden=True),
    ] = None,
    progress_events: Annotated[
        bool,
        typer.Option(
            "--progress-events",
            help="Write the step's progress as event lines on stderr (for the `kollm run` that started it).",
            hidden=True,
        ),
    ] = False,
) -> None:
    """Run exactly one attempt of one step, with explicit inputs: what a Kubernetes pod or a Ray task runs."""
    from kollm.pipeline.progress import EventWriter
    from kollm.pipeline.runner import run_one
    from kollm.pipeline.step import _no_progress

    given: dict[str, str] = {}
    for item in inputs or []:
        name, sep, uri = item.partition("=")
        if not sep or not name or not uri:
            raise KollmError(f"--input {item}: expected NAME=URI, e.g. --input data=file:///shared/steps/KEY/dataset")
        given[name] = uri
    overrides = _json_option("--overrides-json", overrides_json)
    rec = run_one(
        path,
        step,
        inputs=given,
        store_url=store,
        attempt=attempt,
        parent_run_id=parent_run_id,
        force=force,
        overrides=overrides,
        progress=EventWriter(sys.stderr) if progress_events else _no_progress,
    )
    doc = {
        "step": step,
        "key": rec.key,
        "cache_hit": rec.cache_hit,
        "run_id": rec.run_id,
        "metrics": rec.metrics,
        "outputs": {k: {**a.to_json(), "uri": a.path.as_uri() if a.path else None} for k, a in rec.outputs.items()},
    }
    text = json.dumps(doc, ensure_ascii=False)
    if outputs_json is not None:
        from kollm.pipeline.artifacts import write_json_atomic

        write_json_atomic(outputs_json, doc)
    print(text)


def _json_option(flag: str, text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise KollmError(f"{flag}: not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise KollmError(f"{flag}: expected a JSON object")
    return value


# --- deploy (kollm.deploy) ----------------------------------------------------------------------

deploy_app = typer.Typer(
    help="Deployment files from kollm.yaml: Kubernetes (KubeRay, Argo Rollouts, MLflow), Docker Compose, the Dockerfile.",
    no_args_is_help=True,
)
app.add_typer(deploy_app, name="deploy")


@deploy_app.command("render")
def deploy_render(
    path: PathArg = None,
    target: Annotated[str, typer.Option("--target", "-t", help="k8s, kserve, github, compose or docker.")] = "k8s",
    out_dir: Annotated[
        Optional[Path],
        typer.Option("--out", "-o", help="Folder to write the files into (created; default: deploy/TARGET)."),
    ] = None,
    image: Annotated[
        str, typer.Option(help="The kollm image the pods and containers run.")
    ] = "ghcr.io/kollm/kollm:0.1.0",
    bucket: Annotated[str, typer.Option(help="S3 bucket for the artifact store and MLflow's artifacts.")] = "kollm",
    store: Annotated[
        Optional[str], typer.Option(help="Artifact store URL of the steps (default: s3://BUCKET/PROJECT).")
    ] = None,
    s3_endpoint: Annotated[str, typer.Option(help="An S3-compatible endpoint such as MinIO (default: AWS S3).")] = "",
    serve_gpus: Annotated[
        int, typer.Option(help="GPUs per serving replica (0: CPU, transformers backend).", min=0)
    ] = 0,
    replicas: Annotated[
        int, typer.Option(help="Serving replicas of the Rollout (5 gives exact 20 % canary steps).", min=1)
    ] = 5,
    steps: Annotated[str, typer.Option(help="Canary weights in percent, one per step.")] = DEFAULT_STEPS,
    pause: Annotated[
        str, typer.Option(help="How long each step holds its weight before its analysis.")
    ] = DEFAULT_PAUSE,
    analysis: Annotated[
        str, typer.Option(help="Conditions on the canary's requests (as in `kollm rollout start`).")
    ] = DEFAULT_ANALYSIS,
    failure_limit: Annotated[
        int, typer.Option(help="Failed analysis windows that abort the rollout.", min=1)
    ] = DEFAULT_FAILURE_LIMIT,
    prometheus_url: Annotated[
        str, typer.Option(help="Prometheus the AnalysisTemplate queries.")
    ] = "http://prometheus.monitoring.svc:9090",
    model_version: Annotated[
        str, typer.Option(help="kserve: the registered version the InferenceService serves.")
    ] = "1",
    canary_version: Annotated[
        str, typer.Option(help="kserve: the version inferenceservice-canary.yaml serves as the canary.")
    ] = "2",
    llm_model_uri: Annotated[
        str,
        typer.Option(
            help="kserve: the Hugging Face model folder the LLMInferenceService loads (default: s3://BUCKET/PROJECT/hf/champion)."
        ),
    ] = "",
) -> None:
    """Write Kubernetes manifests, KServe resources, a Docker Compose stack or the Dockerfiles for this project (validated offline in kollm's tests)."""
    from kollm.deploy import DeployOptions, render

    options = DeployOptions(
        image=image,
        bucket=bucket,
        store=store or "",
        s3_endpoint=s3_endpoint,
        serve_gpus=serve_gpus,
        serve_replicas=replicas,
        steps=steps,
        pause=pause,
        analysis=analysis,
        failure_limit=failure_limit,
        prometheus_url=prometheus_url,
        model_version=model_version,
        canary_version=canary_version,
        llm_model_uri=llm_model_uri,
    )
    for f in render(path, target, out_dir or Path("deploy") / target, options):
        out.print(f"[green]wrote[/] {f}")


@deploy_app.command("kserve-canary")
def deploy_kserve_canary(
    version: Annotated[str, typer.Argument(help="The registered model version to canary.")],
    path: Annotated[Optional[Path], typer.Option("--project", help="The project folder (default: here).")] = None,
    steps: Annotated[str, typer.Option(help="Canary weights in percent, one per step.")] = DEFAULT_STEPS,
    pause: Annotated[
        str, typer.Option(help="How long each step holds its weight before its analysis.")
    ] = DEFAULT_PAUSE,
    analysis: Annotated[
        str, typer.Option(help="Conditions on the canary's requests (as in `kollm rollout start`).")
    ] = DEFAULT_ANALYSIS,
    namespace: Annotated[str, typer.Option(help="Namespace of the InferenceService (default: kubectl's).")] = "",
) -> None:
    """Print the `kubectl patch` of each canary step of the KServe InferenceService, then promote and rollback."""
    from kollm.deploy import DeployOptions, load_project
    from kollm.deploy.kserve import canary_patches

    p = load_project(path, DeployOptions(steps=steps, pause=pause, analysis=analysis, canary_version=version))
    print(
        f"# each step holds {pause}, then needs {analysis} on the canary's requests: pass -> next step, fail -> rollback"
    )
    for what, line in canary_patches(p, version, namespace):
        print(f"# {what}\n{line}")


compile_app = typer.Typer(help="Compile kollm.yaml for another orchestrator.", no_args_is_help=True)
app.add_typer(compile_app, name="compile")


@compile_app.command("kfp")
def compile_kfp_cmd(
    path: PathArg = None,
    out_file: Annotated[Path, typer.Option("--out", "-o", help="The pipeline IR YAML to write.")] = Path(
        "pipeline.yaml"
    ),
    image: Annotated[str, typer.Option(help="The kollm image every component runs in.")] = "ghcr.io/kollm/kollm:0.1.0",
    store: Annotated[
        Optional[str], typer.Option(help="Artifact store URL of the steps (default: s3://BUCKET/PROJECT).")
    ] = None,
    bucket: Annotated[str, typer.Option(help="S3 bucket of the default store.")] = "kollm",
    ray: Annotated[
        Optional[list[str]],
        typer.Option(
            "--ray", help="Run STEP as a KubeRay RayJob (repeatable; steps with more than one GPU always are)."
        ),
    ] = None,
    project_dir: Annotated[
        str,
        typer.Option(
            help="The project folder inside the image (default: none; kollm.yaml travels as a pipeline parameter)."
        ),
    ] = "",
    namespace: Annotated[str, typer.Option(help="Namespace the RayJobs are created in.")] = "kubeflow",
) -> None:
    """Compile the pipeline to Kubeflow Pipelines IR (kfp 2.17): one component per step running `kollm step run`."""
    from kollm.deploy import DeployOptions
    from kollm.deploy.kfp import compile_kfp

    f = compile_kfp(
        path,
        out_file,
        image=image,
        options=DeployOptions(store=store or "", bucket=bucket),
        ray_steps=tuple(ray or ()),
        project_dir=project_dir,
        namespace=namespace,
    )
    out.print(f"[green]wrote[/] {f}")


@compile_app.command("airflow")
def compile_airflow_cmd(
    path: PathArg = None,
    out_file: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="The DAG file to write (default: dags/kollm_PROJECT.py).")
    ] = None,
    store: Annotated[
        Optional[str], typer.Option(help="Artifact store URL of the steps (default: the project's .kollm/).")
    ] = None,
    schedule: Annotated[
        Optional[str], typer.Option(help="Cron schedule in UTC, as `kollm watch --schedule` (default: none).")
    ] = None,
    kollm_cmd: Annotated[
        str, typer.Option("--kollm", help="The kollm command the tasks run (e.g. /opt/kollm/.venv/bin/kollm).")
    ] = "kollm",
    project_dir: Annotated[
        str, typer.Option(help="The project folder where the tasks run (default: this project's folder).")
    ] = "",
) -> None:
    """Compile the pipeline to an Airflow 3 DAG: one task per step running `kollm step run`."""
    import shlex

    from kollm.deploy.airflow import compile_airflow
    from kollm.deploy.kfp import ident
    from kollm.pipeline.spec import load_pipeline

    if out_file is None:
        out_file = Path("dags") / f"kollm_{ident(load_pipeline(path).cfg.project)}.py"
    f = compile_airflow(
        path,
        out_file,
        store=store or "",
        schedule=schedule,
        kollm=tuple(shlex.split(kollm_cmd)),
        project_dir=project_dir,
    )
    out.print(f"[green]wrote[/] {f}")


# --- serve (kollm.serve) ------------------------------------------------------------------------


@app.command("serve")
def serve_cmd(
    model_uri: Annotated[
        str, typer.Argument(help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/PATH or a local model folder.")
    ],
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 for all interfaces).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[
        Optional[str],
        typer.Option(
            help="Require `Authorization: Bearer KEY` on /v1 routes (default: $KOLLM_API_KEY; unset: no auth)."
        ),
    ] = None,
    served_model_name: Annotated[
        Optional[str], typer.Option(help="The `model` name clients send (default: the registered name or folder name).")
    ] = None,
    backend: Annotated[
        str,
        typer.Option(
            help="auto (vLLM where it imports, else transformers), transformers (kollm's native engine) or vllm."
        ),
    ] = "auto",
    device: Annotated[
        str, typer.Option(help="auto, cpu, cuda or cuda:N (the native engine; vLLM uses the device its build targets).")
    ] = "auto",
    dtype: Annotated[
        str, typer.Option(help="auto (bfloat16 on CUDA, float32 on CPU), bfloat16, float16 or float32.")
    ] = "auto",
    max_batch_size: Annotated[int, typer.Option(help="Most sequences decoded together.", min=1)] = 32,
    context_length: Annotated[
        Optional[int], typer.Option(help="Cap on prompt + output tokens (default: the model's).", min=1)
    ] = None,
    graceful_timeout: Annotated[
        float, typer.Option(help="Seconds to let in-flight requests finish on SIGTERM/Ctrl-C.")
    ] = 30.0,
    kv_cache: Annotated[
        str,
        typer.Option(
            help="The native engine's KV cache: auto (static on CUDA for Llama-family models), static (preallocated slots, CUDA graphs on CUDA) or dynamic (any model)."
        ),
    ] = "auto",
    prefix_cache: Annotated[
        bool,
        typer.Option(
            help="The native engine with the static KV cache: reuse the keys and values of prompt prefixes seen before (blocks of 16 tokens, least recently used evicted)."
        ),
    ] = True,
    speculative: Annotated[
        Optional[str],
        typer.Option(
            help="The native engine with the static KV cache: ngram for speculative decoding with prompt-lookup drafts, draft for drafts from --draft-model (greedy requests; off by default)."
        ),
    ] = None,
    draft_model: Annotated[
        Optional[Path],
        typer.Option(help="With --speculative draft: a small model folder of the same tokenizer that drafts tokens."),
    ] = None,
    engine_arg: Annotated[
        Optional[list[str]],
        typer.Option(
            help="--backend vllm: KEY=VALUE for vLLM's engine arguments, repeatable (e.g. enforce_eager=true, gpu_memory_utilization=0.5)."
        ),
    ] = None,
    project: ProjectOpt = None,
    canary: Annotated[
        Optional[str],
        typer.Option(
            help="Also serve this version as a canary behind a gateway (e.g. models:/NAME@challenger, followed like MODEL_URI: a challenger registered later becomes the next canary); drive it with `kollm rollout`."
        ),
    ] = None,
    inject_faults: Annotated[
        Optional[str],
        typer.Option(
            help="TESTING AID: fail or slow generation requests, e.g. error_rate=0.3,latency_ms=200 (see kollm.serve.faults); with --canary, the canary's only."
        ),
    ] = None,
    follow_interval: Annotated[
        float,
        typer.Option(
            help="With models:/NAME@ALIAS: seconds between registry checks; a new version the alias points to replaces the served one without failing requests (0: do not follow)."
        ),
    ] = 10.0,
    max_request_bytes: Annotated[
        int, typer.Option(help="Largest request body accepted (a bigger one gets 413).", min=1024)
    ] = 4 * 1024 * 1024,
    embedding_model: Annotated[
        Optional[str],
        typer.Option(
            help="Log each prompt's embedding by this Hugging Face model folder (e.g. the served model's), for `kollm monitor drift --embedding-model` (not with --canary)."
        ),
    ] = None,
    allowed_host: Annotated[
        Optional[list[str]],
        typer.Option(
            help="A Host name clients may use besides the bound address and loopback names, repeatable (also $KOLLM_ALLOWED_HOSTS, comma-separated; * for any). Bound to 0.0.0.0 with none given: any Host."
        ),
    ] = None,
    adapters: Annotated[
        Optional[list[str]],
        typer.Option(
            "--adapters",
            help="NAME=URI of a LoRA adapter of this base (models:/ADAPTER@ALIAS, a folder, ...), repeatable: served under model name NAME, loaded on its first request.",
        ),
    ] = None,
    max_adapters: Annotated[
        int, typer.Option(help="With --adapters: most adapters loaded at once (least recently used evicted).", min=1)
    ] = 8,
    adapters_from_lineage: Annotated[
        bool,
        typer.Option(
            "--adapters-from-lineage",
            help="Also serve every registered LoRA adapter trained on this base (tag kollm.base_model_digest), each under its registered model name (its champion version, else its newest).",
        ),
    ] = False,
) -> None:
    """Serve a model with an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models, /metrics).

    Exit codes: 0 after Ctrl-C/SIGTERM, 2 bad options, 4 model not found, 5 could not listen (port in use)."""
    from functools import partial

    from kollm.serve import serve
    from kollm.serve.vllm_engine import parse_engine_args

    extra: dict[str, Any] = {
        "follow_interval": follow_interval,
        "inject_faults": inject_faults,
        "allowed_hosts": allowed_host or [],
    }
    if inject_faults:
        from kollm.serve.faults import parse_faults

        parse_faults(inject_faults)  # a bad option is named before the model loads
    if adapters:
        from kollm.errors import ConfigError

        pairs = [a.partition("=") for a in adapters]
        bad = next((a for a, (n, eq, u) in zip(adapters, pairs) if not (n and eq and u)), None)
        if bad is not None:
            raise ConfigError(f"--adapters {bad}: expected NAME=URI, e.g. support=models:/support-lora@champion")
        if canary is not None:
            raise ConfigError(
                "--adapters is not supported with --canary; to canary one adapter against another on one base, "
                "serve the adapter's versions: kollm serve models:/ADAPTER@champion --canary models:/ADAPTER@challenger"
            )
        extra |= {"adapters": {n: u for n, _, u in pairs}, "max_adapters": max_adapters}
    if adapters_from_lineage:
        if canary is not None:
            from kollm.errors import ConfigError

            raise ConfigError(
                "--adapters-from-lineage is not supported with --canary; serve the adapters without a canary"
            )
        extra |= {"adapters_from_lineage": True, "max_adapters": max_adapters}
    if canary is not None:
        from kollm.rollout.serving import serve_canary

        serve = partial(serve_canary, canary_uri=canary)  # the same options; a gateway routes between both models
        if embedding_model:
            raise KollmError(
                "--embedding-model is not supported with --canary",
                hint="log embeddings from a plain `kollm serve MODEL --embedding-model PATH`",
            )
    else:
        extra |= {"max_body_bytes": max_request_bytes, "embedding_model": embedding_model}
    serve(
        model_uri,
        host=host,
        port=port,
        api_key=api_key,
        project_dir=project_dir(project),
        served_model_name=served_model_name,
        backend=backend,  # type: ignore[arg-type]  # checked by load_engine
        device=device,
        dtype=dtype,
        max_batch_size=max_batch_size,
        context_length=context_length,
        graceful_timeout=graceful_timeout,
        engine_args=parse_engine_args(engine_arg or []),
        kv_cache=kv_cache,
        prefix_cache=prefix_cache,
        speculative=speculative,
        draft_model=draft_model,
        **extra,
    )


# --- registry (kollm.registry) ------------------------------------------------------------------

registry_app = typer.Typer(
    help="The model registry (MLflow aliases champion / challenger / previous): list, show, promote, rollback.",
    no_args_is_help=True,
)
app.add_typer(registry_app, name="registry")
ModelNameArg = Annotated[Optional[str], typer.Argument(help="Registered model name (default: the project name).")]
ReasonOpt = Annotated[
    str, typer.Option("--reason", "-m", help="Why; stored in the audit trail and on the version's tags.")
]
RegistryJsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _registry_project(project: Path | None) -> Path | None:
    """The project whose registry a `kollm registry` command uses; outside one, $MLFLOW_TRACKING_URI's (never a
    new .kollm/mlflow.db in the current folder)."""
    from kollm.pipeline.tracking import USER_TRACKING_URI

    proj = project_dir(project)
    if proj is None and not USER_TRACKING_URI:
        raise KollmError(
            f"no kollm.yaml in {Path.cwd()} and MLFLOW_TRACKING_URI is not set: no registry to read",
            hint="run inside a project, pass --project DIR, or set MLFLOW_TRACKING_URI",
        )
    return proj


def _model_name(name: str | None, project: Path | None) -> str:
    if name:
        return name
    if project is None:
        raise KollmError(
            "no model name given and no kollm.yaml here", hint="pass NAME, run inside a project, or use --project DIR"
        )
    from kollm.config import load_config

    return load_config(project)[0].project


def _version_dict(v: Any) -> dict[str, Any]:
    return {
        "name": v.name,
        "version": v.version,
        "aliases": list(v.aliases),
        "run_id": v.run_id,
        "source": v.source,
        "created": v.created.isoformat(timespec="seconds"),
        "description": v.description,
        "tags": v.tags,
    }


@registry_app.command("list")
def registry_list(name: ModelNameArg = None, project: ProjectOpt = None, as_json: RegistryJsonOpt = False) -> None:
    """Versions of a registered model, newest first, with aliases, gate and metrics (no NAME outside a project: all models)."""
    from kollm import registry

    proj = _registry_project(project)
    if name is None and proj is None:
        names = registry.list_models(None)
        if as_json:
            print(json.dumps(names))
        else:
            out.print("\n".join(names) or "no registered models")
        return
    model = _model_name(name, proj)
    versions = registry.list_versions(model, proj)
    if as_json:
        print(json.dumps([_version_dict(v) for v in versions], ensure_ascii=False, indent=2))
        return
    print_table(versions_table(model, versions))


def versions_table(model: str, versions: list[Any]) -> Table:
    table = new_table(escape(model))
    for col in ("version", "aliases", "created", "gate", "perplexity", "base model"):
        text_column(table, col)
    id_column(table, "run", 10)  # the pipeline run that trained it
    for v in versions:
        table.add_row(
            v.version,
            escape(", ".join(v.aliases)),
            v.created.strftime("%Y-%m-%d %H:%M"),
            escape(clip(v.tags.get("kollm.gate", ""), 60)),
            v.tags.get("kollm.metric.perplexity", ""),
            escape(clip(v.tags.get("kollm.base_model", ""), 60)),
            v.tags.get("kollm.pipeline_run_id", ""),
        )
    return table


@registry_app.command("show")
def registry_show(
    name: ModelNameArg = None,
    ref: Annotated[str, typer.Argument(help="A version number or an alias.")] = "champion",
    project: ProjectOpt = None,
    as_json: RegistryJsonOpt = False,
) -> None:
    """One version (default: the champion): aliases, lineage tags, metrics and its alias history."""
    from kollm import registry

    proj = _registry_project(project)
    if name is not None and (name.isdigit() or name.startswith("@")) and ref == "champion":
        ref = name  # `kollm registry show 3` / `show @challenger` inside a project
        name = None
    model = _model_name(name, proj)
    v = registry.show(model, ref, proj)
    trail = [e for e in registry.audit_trail(model, proj) if e.version == v.version or e.replaced == v.version]
    if as_json:
        print(json.dumps({**_version_dict(v), "history": [e.__dict__ for e in trail]}, ensure_ascii=False, indent=2))
        return
    out.print(
        f"[bold]{escape(v.uri)}[/]  aliases: {escape(', '.join(v.aliases) or '-')}  created {v.created:%Y-%m-%d %H:%M} UTC"
    )
    out.print(f"run {v.run_id}  source {escape(v.source)}")
    print_table(tags_table(v.tags))
    for e in trail:
        moved = f"{e.alias} -> v{e.version}" + (f" (was v{e.replaced})" if e.replaced else "")
        out.print(f"{e.at}  {e.action:8}  {escape(moved)}  by {escape(e.user)}: {escape(e.reason)}")


@registry_app.command("promote")
def registry_promote(
    name: ModelNameArg = None,
    version: Annotated[
        Optional[str], typer.Option("--version", help="The version to promote (default: the challenger).")
    ] = None,
    reason: ReasonOpt = "promoted from the command line",
    project: ProjectOpt = None,
) -> None:
    """Make a version (default: the challenger) the champion; the old champion becomes `previous`."""
    from kollm import registry

    proj = _registry_project(project)
    move = registry.promote(_model_name(name, proj), version, reason=reason, project_dir=proj)
    before = f"; previous -> v{move.previous}" if move.previous else ""
    out.print(f"[green]promoted[/] {escape(move.name)}: champion -> v{move.champion}{before}")


@registry_app.command("rollback")
def registry_rollback(
    name: ModelNameArg = None, reason: ReasonOpt = "rolled back from the command line", project: ProjectOpt = None
) -> None:
    """Restore the `previous` version as champion (the rolled-back version is tagged with when and why)."""
    from kollm import registry

    proj = _registry_project(project)
    move = registry.rollback(_model_name(name, proj), reason=reason, project_dir=proj)
    out.print(f"[yellow]rolled back[/] {escape(move.name)}: champion -> v{move.champion} (was v{move.replaced})")


def tags_table(tags: dict[str, str]) -> Table:
    """A version's tags, one per row; a long value is cut to a few lines (all of it: `registry show --json`)."""
    table = new_table("tags", show_header=False)
    text_column(table, "tag")
    text_column(table, "value")
    for key in sorted(k for k in tags if not k.startswith("mlflow.")):
        table.add_row(escape(key), escape(clip(tags[key], 200)))
    return table


# --- rollout (kollm.rollout) --------------------------------------------------------------------

rollout_app = typer.Typer(
    help="Canary rollout of the challenger served by `kollm serve MODEL --canary models:/NAME@challenger` (talks to its /admin/rollout/ API).",
    no_args_is_help=True,
)
app.add_typer(rollout_app, name="rollout")
GatewayOpt = Annotated[
    Optional[str],
    typer.Option("--gateway", help="The gateway's URL (default: $KOLLM_GATEWAY, else http://127.0.0.1:8000)."),
]
AdminKeyOpt = Annotated[
    Optional[str], typer.Option("--api-key", help="The gateway's API key (default: $KOLLM_API_KEY).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the full status as JSON.")]


def _rollout_print(data: dict[str, Any], as_json: bool) -> None:
    from kollm.rollout.client import format_status

    print(json.dumps(data, ensure_ascii=False, indent=2)) if as_json else out.print(
        escape(format_status(data)), highlight=False
    )


@rollout_app.command("start")
def rollout_start(
    name: Annotated[str, typer.Argument(help="The registered model name whose canary the gateway serves.")],
    steps: Annotated[str, typer.Option(help="Canary weights in percent, one per step.")] = DEFAULT_STEPS,
    pause: Annotated[
        str, typer.Option(help="How long each step holds its weight before its analysis (e.g. 2m, 30s).")
    ] = DEFAULT_PAUSE,
    analysis: Annotated[
        str,
        typer.Option(
            help="Conditions on the canary's requests in each step (metrics: success_rate, error_rate, p50_ms, p95_ms, p99_ms, mean_ms, probe_pass_rate, judge_win_rate)."
        ),
    ] = DEFAULT_ANALYSIS,
    failure_limit: Annotated[
        int, typer.Option(help="Failed analyses that roll the canary back.")
    ] = DEFAULT_FAILURE_LIMIT,
    min_requests: Annotated[
        int, typer.Option(help="Fewer canary requests in a step make its analysis inconclusive (the step is held).")
    ] = DEFAULT_MIN_REQUESTS,
    alert_webhook: Annotated[
        Optional[str],
        typer.Option(
            help="Slack-compatible webhook for rollback/abort/promotion alerts (default: $KOLLM_ALERT_WEBHOOK)."
        ),
    ] = None,
    probe: Annotated[
        Optional[Path],
        typer.Option(
            help='Quality probe: a JSONL file of {"prompt": ..., "expect": ...} sent to the canary every step.'
        ),
    ] = None,
    judge_url: Annotated[
        Optional[str],
        typer.Option(
            help="Canary judge: an OpenAI-compatible endpoint (e.g. http://127.0.0.1:8001/v1) that judges sampled canary requests answered by both arms (metric judge_win_rate)."
        ),
    ] = None,
    judge_model: Annotated[Optional[str], typer.Option(help="The judge's model name at --judge-url.")] = None,
    judge_key_env: Annotated[
        Optional[str],
        typer.Option(help="Environment variable of the gateway's process that holds the judge's API key."),
    ] = None,
    judge_calls: Annotated[
        int, typer.Option(help="Most judge calls per analysis window (two per sampled request: both orders).")
    ] = 16,
    judge_rubric: Annotated[
        Optional[Path], typer.Option(help="A rubric file (YAML/JSON) for the judge (default: the Korean rubric).")
    ] = None,
    gateway: GatewayOpt = None,
    api_key: AdminKeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Start the rollout: 20 -> 40 -> 60 -> 80 % with analysis after each step, then promote (or roll back)."""
    from kollm.rollout.client import start

    _rollout_print(
        start(
            name,
            steps=steps,
            pause=pause,
            analysis=analysis,
            failure_limit=failure_limit,
            min_requests=min_requests,
            alert_webhook=alert_webhook,
            probe=probe,
            judge_url=judge_url,
            judge_model=judge_model,
            judge_key_env=judge_key_env,
            judge_calls=judge_calls,
            judge_rubric=judge_rubric,
            gateway=gateway,
            api_key=api_key,
        ),
        as_json,
    )


@rollout_app.command("status")
def rollout_status(gateway: GatewayOpt = None, api_key: AdminKeyOpt = None, as_json: JsonOpt = False) -> None:
    """Show the weights, the current step and the analysis results."""
    from kollm.rollout.client import command

    _rollout_print(command("status", gateway=gateway, api_key=api_key), as_json)


@rollout_app.command("pause")
def rollout_pause(gateway: GatewayOpt = None, api_key: AdminKeyOpt = None, as_json: JsonOpt = False) -> None:
    """Hold the current weight; no analysis until resumed."""
    from kollm.rollout.client import command

    _rollout_print(command("pause", gateway=gateway, api_key=api_key), as_json)


@rollout_app.command("resume")
def rollout_resume(gateway: GatewayOpt = None, api_key: AdminKeyOpt = None, as_json: JsonOpt = False) -> None:
    """Continue a paused rollout (the current step starts a fresh analysis window)."""
    from kollm.rollout.client import command

    _rollout_print(command("resume", gateway=gateway, api_key=api_key), as_json)


@rollout_app.command("abort")
def rollout_abort(
    reason: Annotated[
        str, typer.Option(help="Why; recorded on the version and sent with the alert.")
    ] = "aborted by user",
    gateway: GatewayOpt = None,
    api_key: AdminKeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Send all traffic back to the champion now; the champion alias does not move."""
    from kollm.rollout.client import command

    _rollout_print(command("abort", reason=reason, gateway=gateway, api_key=api_key), as_json)


@rollout_app.command("promote")
def rollout_promote(gateway: GatewayOpt = None, api_key: AdminKeyOpt = None, as_json: JsonOpt = False) -> None:
    """Promote the canary now, skipping the remaining steps: champion -> canary version, previous kept."""
    from kollm.rollout.client import command

    _rollout_print(command("promote", gateway=gateway, api_key=api_key), as_json)


# --- monitor (kollm.monitor) --------------------------------------------------------------------

monitor_app = typer.Typer(
    help="Monitoring: Prometheus rules and dashboards, the training/drift exporter, drift reports.",
    no_args_is_help=True,
)
app.add_typer(monitor_app, name="monitor")


@monitor_app.command("config")
def monitor_config(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write prometheus.yml, rules/ and dashboards/ into.")],
    target: Annotated[
        list[str],
        typer.Option("--target", help="JOB=HOST:PORT to scrape (repeatable), e.g. kollm-serve=127.0.0.1:8000."),
    ],
    scrape_interval: Annotated[str, typer.Option(help="Prometheus scrape interval.")] = "15s",
    evaluation_interval: Annotated[str, typer.Option(help="Prometheus rule evaluation interval.")] = "15s",
) -> None:
    """Write a prometheus.yml that scrapes TARGETs with kollm's alerting and recording rules, plus the Grafana dashboards."""
    from kollm.monitor.prometheus import write_config

    path = write_config(out_dir, target, scrape_interval=scrape_interval, evaluation_interval=evaluation_interval)
    out.print(f"[green]wrote[/] {path}  —  next: [bold]prometheus --config.file={path}[/]")


@monitor_app.command("exporter")
def monitor_exporter(
    project: ProjectOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 9464,
) -> None:
    """Serve /metrics with training (loss, step, GPU memory) and drift gauges read from the project's .kollm files."""
    from kollm.monitor.exporter import run_exporter

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_exporter(project_dir(project) or Path.cwd(), host=host, port=port)


@monitor_app.command("drift")
def monitor_drift(
    project: ProjectOpt = None,
    reference: Annotated[
        Optional[Path],
        typer.Option(
            help="The training data: a prepared dataset folder (train.parquet + stats.json), or a .parquet/.jsonl of `text` rows (default: the newest prepared dataset under .kollm)."
        ),
    ] = None,
    window: Annotated[str, typer.Option(help="How much recent traffic to compare (e.g. 24h, 30m, 7d).")] = "24h",
    threshold: Annotated[
        float, typer.Option(help="PSI over which a feature counts as drifted (0.1 small, 0.25 significant).")
    ] = 0.25,
    min_requests: Annotated[int, typer.Option(help="Fewer served requests in the window is an error.", min=1)] = 30,
    mlflow: Annotated[
        bool, typer.Option("--mlflow/--no-mlflow", help="Log the result as MLflow metrics (experiment kollm-monitor).")
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    embedding_model: Annotated[
        Optional[str],
        typer.Option(
            help="Also compare prompt embeddings (MMD² test) by this model: the one `kollm serve --embedding-model` logged them with."
        ),
    ] = None,
    alpha: Annotated[
        float, typer.Option(help="Embedding drift when the MMD² test's p-value is below this.", min=0.0, max=1.0)
    ] = 0.01,
) -> None:
    """Compare recent served traffic (.kollm/logs/inference) with the training data per feature (PSI, KS), and with
    --embedding-model on prompt embeddings; write an HTML report."""
    from kollm.monitor.drift import check_drift

    root = project_dir(project) or Path.cwd()
    result = check_drift(
        root,
        reference,
        window=window,
        threshold=threshold,
        min_requests=min_requests,
        track=mlflow,
        embedding_model=embedding_model,
        alpha=alpha,
    )
    if as_json:
        print(json.dumps(result.to_json(), ensure_ascii=False, indent=2))
        return
    print_table(drift_table(result))
    if (e := result.embedding) is not None:
        out.print(
            f"prompt embeddings ({escape(e.model)}): MMD² {e.mmd2:.4g}, p {e.p_value:.3g}: "
            + ("[red]drifted[/]" if e.drifted else "ok")
        )
    out.print(f"report: {escape(result.report)}")


def drift_table(result: Any) -> Table:
    table = new_table(
        f"{result.window_requests} requests in the last {result.window} vs {result.reference_rows} reference rows"
    )
    for col in ("feature", "PSI", "KS", "KS p", "reference mean", "current mean", ""):
        text_column(table, col)
    for name, f in result.features.items():
        table.add_row(
            name,
            f"{f.psi:.3f}",
            f"{f.ks_statistic:.3f}",
            f"{f.ks_pvalue:.2g}",
            f"{f.reference_mean:.3f}",
            f"{f.current_mean:.3f}",
            "[red]drifted[/]" if f.drifted else "ok",
        )
    return table


# --- watch (kollm.monitor.watch) ----------------------------------------------------------------


@app.command("watch")
def watch_cmd(
    project: ProjectOpt = None,
    once: Annotated[
        bool, typer.Option("--once", help="Run one cycle and exit (for cron or a Kubeflow recurring run).")
    ] = False,
    now: Annotated[bool, typer.Option("--now", help="Add a manual trigger: retrain in this cycle.")] = False,
    schedule: Annotated[
        Optional[str], typer.Option(help="Cron schedule in UTC, e.g. '0 3 * * *' (daily at 03:00).")
    ] = None,
    data: Annotated[
        bool, typer.Option("--data/--no-data", help="Trigger when the project's local data sources change (digest).")
    ] = True,
    drift_threshold: Annotated[
        Optional[float], typer.Option(help="Trigger when a feature's PSI is over this (see `kollm monitor drift`).")
    ] = None,
    drift_window: Annotated[str, typer.Option(help="Traffic window for the drift check.")] = "24h",
    drift_every: Annotated[str, typer.Option(help="How often to check drift (e.g. 1h).")] = "1h",
    gateway: Annotated[
        Optional[str],
        typer.Option(
            help="The canary gateway to roll a new challenger out on (`kollm serve ... --canary models:/NAME@challenger`); none: only register."
        ),
    ] = None,
    api_key: AdminKeyOpt = None,
    model_name: Annotated[
        Optional[str], typer.Option(help="Registered model name (default: the project name).")
    ] = None,
    steps: Annotated[str, typer.Option(help="Canary weights in percent.")] = DEFAULT_STEPS,
    pause: Annotated[str, typer.Option(help="Hold per canary step before its analysis.")] = DEFAULT_PAUSE,
    analysis: Annotated[str, typer.Option(help="Canary analysis conditions.")] = DEFAULT_ANALYSIS,
    min_requests: Annotated[
        int, typer.Option(help="Canary requests a step needs for its analysis.")
    ] = DEFAULT_MIN_REQUESTS,
    alert_webhook: Annotated[
        Optional[str], typer.Option(help="Slack-compatible webhook for outcomes (default: $KOLLM_ALERT_WEBHOOK).")
    ] = None,
    webhook_port: Annotated[
        Optional[int], typer.Option(help="Receive MLflow registry webhooks on this port (long-running mode).")
    ] = None,
    webhook_secret: Annotated[
        Optional[str],
        typer.Option(help="The MLflow webhook's secret for HMAC verification (default: $KOLLM_WEBHOOK_SECRET)."),
    ] = None,
    interval: Annotated[str, typer.Option(help="Time between cycles in long-running mode.")] = "1m",
    as_json: Annotated[bool, typer.Option("--json", help="Print the outcome of --once as JSON.")] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Roll out a challenger even if it was rolled back before.")
    ] = False,
) -> None:
    """Retrain on a schedule, new data, drift or a registry webhook; roll a gated challenger out on the gateway."""
    from kollm.monitor.drift import parse_window
    from kollm.monitor.watch import WatchSettings, parse_cron, run_cycle, watch

    if schedule:
        parse_cron(schedule)
    if alert_webhook:
        from kollm.monitor.alerts import check_webhook_url

        check_webhook_url(alert_webhook)
    settings = WatchSettings(
        project_dir=project_dir(project) or Path.cwd(),
        schedule=schedule,
        watch_data=data,
        drift_threshold=drift_threshold,
        drift_window=drift_window,
        drift_every_s=parse_window(drift_every),
        gateway=gateway,
        api_key=api_key,
        model_name=model_name,
        rollout_steps=steps,
        rollout_pause=pause,
        rollout_analysis=analysis,
        rollout_min_requests=min_requests,
        alert_webhook=alert_webhook,
        webhook_port=webhook_port,
        webhook_secret=webhook_secret or os.environ.get("KOLLM_WEBHOOK_SECRET"),
        force=force,
    )
    if not (settings.project_dir / "kollm.yaml").exists():
        raise KollmError(f"no kollm.yaml in {settings.project_dir}", hint="run inside a project or pass --project DIR")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per gateway status poll
    if not once:
        watch(settings, interval_s=parse_window(interval))
        return
    outcome = run_cycle(settings, manual=now)
    if as_json:
        print(json.dumps(outcome.to_json(), ensure_ascii=False, indent=2))
    else:
        out.print(f"[bold]{outcome.kind}[/]: {escape(outcome.message)}", highlight=False)
        if outcome.steps_run or outcome.steps_cached:
            out.print(
                f"  steps run: {', '.join(outcome.steps_run) or '-'}; from the cache: {', '.join(outcome.steps_cached) or '-'}"
            )
    if outcome.kind in (
        "failed",
        "gate_failed",
        "rolled_back",
        "aborted",
        "rollout_timeout",
        "gateway_not_serving_challenger",
    ):
        raise typer.Exit(1)


# --- ui (kollm.ui) ------------------------------------------------------------------------------


@app.command("ui")
def ui_cmd(
    project: ProjectOpt = None,
    host: Annotated[
        str, typer.Option(help="Address to listen on; anything but 127.0.0.1 needs --api-key.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    api_key: Annotated[
        Optional[str],
        typer.Option(
            help="The gateway's API key (default: $KOLLM_API_KEY); needed to promote, roll back or steer a rollout. Without it the UI is read-only."
        ),
    ] = None,
    gateway: GatewayOpt = None,
) -> None:
    """A web dashboard: runs and their step graphs, steps, registry, lineage and the live rollout."""
    from kollm.ui import serve_ui

    proj = project_dir(project)
    if proj is None:
        raise KollmError("no kollm.yaml here", hint="run inside a project folder or pass --project DIR")
    serve_ui(proj, host=host, port=port, api_key=api_key, gateway=gateway)


def _readable_help(group: typer.Typer) -> None:
    """typer shows a parameter without a metavar as its Python type (`<list[str]>`, `<bool>`, `<path>`) in --help.
    Give each one a word instead: flags none, arguments their name (OUT_DIR), options their kind (TEXT, PATH,
    INTEGER, NUMBER; a repeatable option says so in its help). The app's help is click's plain layout
    (rich_markup_mode=None), which shows a flag without a type."""
    import typing

    import typer.core
    from typer.models import ArgumentInfo, OptionInfo

    # typer prints an argument's Python type beside its name whatever its metavar ("OUT_DIR <path>"); the name
    # and its help say enough
    typer.core.TyperArgument.display_type_rich = lambda self, ctx: None  # type: ignore[method-assign]

    kinds = {int: "INTEGER", float: "NUMBER", Path: "PATH", str: "TEXT"}
    for cmd in group.registered_commands:
        if cmd.callback is None:
            continue
        # resolved once and kept: each evaluation of a string annotation (PEP 563) builds new OptionInfo objects
        hints = typing.get_type_hints(cmd.callback, include_extras=True)
        cmd.callback.__annotations__ = hints
        for name, hint in hints.items():
            if typing.get_origin(hint) is not Annotated:
                continue
            base, *meta = typing.get_args(hint)
            while typing.get_origin(base) in (typing.Union, list):
                base = next(a for a in typing.get_args(base) if a is not type(None))
            for info in meta:
                if not isinstance(info, (OptionInfo, ArgumentInfo)) or info.metavar is not None:
                    continue
                if isinstance(info, ArgumentInfo):
                    info.metavar = name.upper()
                else:
                    info.metavar = "" if base is bool else kinds.get(base, "TEXT")
    for sub in group.registered_groups:
        if sub.typer_instance is not None:
            _readable_help(sub.typer_instance)


def main() -> None:
    # kollm draws its own progress; library bars and chatter would bury it (set these to see them again).
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        app()  # standalone: typer prints usage errors itself (exit 2); our errors come out here
    except KollmError as e:
        head = f"step '{e.step}': " if e.step and f"'{e.step}'" not in e.message else ""
        err.print(f"[bold red]error:[/] {escape(mask_text(head + e.message))}", highlight=False, soft_wrap=True)
        if e.hint:
            err.print(f"  [dim]hint:[/] {escape(mask_text(e.hint))}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except ImportError as e:  # an optional package a command needs is missing (or broken): one line, no traceback
        if not e.name or e.name.split(".")[0] == "kollm":
            raise  # kollm's own import bug: the traceback helps
        missing = f" ('{e.name}')"
        err.print(
            f"[bold red]error:[/] a package this command needs is missing{missing}: {escape(str(e))}",
            highlight=False,
            soft_wrap=True,
        )
        err.print(
            "  [dim]hint:[/] install kollm's extra for it (README: Set up), e.g. pip install 'kollm[kfp]'",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)
    except KeyboardInterrupt:
        _interrupted()
    except SystemExit as e:
        if e.code == 130:  # typer turns Ctrl-C (KeyboardInterrupt) into exit code 130
            _interrupted()
        raise
    except Exception as e:  # a bug, or a library error we do not wrap: its traceback as Python prints it, masked
        sys.stderr.write(mask_text("".join(traceback.format_exception(e))))
        sys.stderr.flush()
        sys.exit(1)


def _interrupted() -> None:
    """Ctrl-C: say what happened (and for `kollm run`, how to resume), exit 130. Plain writes: rich's console may
    have been mid-print in the frame the interrupt hit."""
    if "run" in sys.argv[1:2]:
        sys.stderr.write(
            "\ninterrupted: the run stopped; finished steps are kept. "
            "Run `kollm run` again to resume it (finished steps are reused from the cache).\n"
        )
    else:
        sys.stderr.write("\ninterrupted\n")
    sys.stderr.flush()
    sys.exit(130)


_readable_help(app)  # after every command above is registered

if __name__ == "__main__":
    main()
