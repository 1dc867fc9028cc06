"""The `kollm` command line: a thin typer app; each command calls one library function."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kollm.errors import KollmError

app = typer.Typer(help="kollm: Korean corpus -> trained, evaluated, registered, served and rolled-out LLM.", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
step_app = typer.Typer(help="Run single steps (used by the Ray and Kubeflow executors).", no_args_is_help=True)
app.add_typer(step_app, name="step")
out = Console()
err = Console(stderr=True)
T = TypeVar("T")

PathArg = Annotated[Optional[Path], typer.Argument(help="kollm.yaml or the folder that holds it (default: the current folder).")]
ProjectOpt = Annotated[Optional[Path], typer.Option("--project", help="Project folder whose tracking and registry settings to use (default: the current folder if it holds kollm.yaml).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or step lines.")]


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
) -> None:
    """Create a runnable example project (its data is generated or read from installed packages)."""
    from kollm.examples import init_project

    path = init_project(dest, example)
    out.print(f"[green]created[/] {path}  —  next: [bold]cd {dest} && kollm run[/]")


@app.command()
def validate(path: PathArg = None) -> None:
    """Check kollm.yaml: fields, step configs, data files and the wiring of inputs."""
    from kollm.pipeline.spec import load_pipeline

    pipe = load_pipeline(path)
    table = Table(title=f"{pipe.cfg.project}: {len(pipe.steps)} steps", title_justify="left")
    for col in ("#", "step", "kind", "inputs", "outputs"):
        table.add_column(col)
    for s in pipe.steps:
        ins = ", ".join(f"{k} <- {v}" for k, v in s.inputs.items())
        outs = ", ".join(f"{k}: {v}" for k, v in s.outputs.items())
        table.add_row(str(s.index), s.name, s.kind, ins, outs)
    out.print(table)
    out.print(f"[green]ok[/] {pipe.file}")


@app.command("run")
def run_cmd(
    path: PathArg = None,
    from_step: Annotated[Optional[str], typer.Option("--from", help="Reuse cached steps before STEP; re-run it and all later steps.")] = None,
    only: Annotated[Optional[str], typer.Option("--only", help="Run only STEP (earlier steps must be cached).")] = None,
    force: Annotated[Optional[list[str]], typer.Option("--force", help="Re-run STEP even if cached (repeatable).")] = None,
    executor: Annotated[str, typer.Option(help="Executor: local.")] = "local",
    quiet: QuietOpt = False,
) -> None:
    """Run the pipeline. Finished steps whose config, inputs and code are unchanged are reused."""
    from kollm.pipeline.runner import run

    if executor != "local":
        raise KollmError(f"--executor {executor}: only 'local' is available in this version")
    show = not quiet
    t0 = time.perf_counter()

    def report(event: str, step: str, detail: dict[str, Any]) -> None:
        if not show:
            return
        if event == "started":
            err.print(f"[cyan]▶[/] {step} [dim]{detail['key'][:12]}[/]")
        elif event == "cached":
            err.print(f"[green]✓[/] {step} [dim](cached, {detail['duration_s']:.2f}s)[/]")
        elif event == "finished":
            err.print(f"[green]✓[/] {step} [dim]({detail['duration_s']:.1f}s)[/]")
        elif event == "retry":
            err.print(f"[yellow]↻[/] {step}: attempt {detail['attempt']} in {detail['delay_s']:.1f}s after {detail['error']}")
        elif event == "failed":
            err.print(f"[red]✗[/] {step}")

    result = run(path, force=force or (), from_step=from_step, only=only, report=report, progress=_progress(show))
    hits = sum(r.cache_hit for r in result.steps.values())
    if show:
        err.print(f"[bold green]done[/] run {result.run_id} — {len(result.steps)} steps, {hits} cached, {time.perf_counter() - t0:.1f}s")
    else:
        print(result.run_id)


def _progress(enabled: bool):
    """ctx.progress for steps: a rich progress bar on a terminal, nothing otherwise."""

    def progress(items: Iterable[T], *, total: int | None = None, description: str = "") -> Iterator[T]:
        if not enabled or not err.is_terminal:
            yield from items
            return
        from rich.progress import track

        yield from track(items, total=total, description=description or "working", console=err, transient=True)

    return progress


@app.command()
def runs(
    path: PathArg = None,
    limit: Annotated[int, typer.Option(help="How many runs to list.")] = 20,
) -> None:
    """List pipeline runs (newest first)."""
    from kollm.pipeline.history import list_runs

    rows = list_runs(path, limit=limit)
    table = Table(title_justify="left")
    for col in ("run", "started", "status", "steps", "cached", "duration"):
        table.add_column(col)
    for r in rows:
        table.add_row(r.run_id, r.started, r.status, str(r.steps), str(r.cache_hits), r.duration)
    out.print(table if rows else "no runs yet — `kollm run` starts one")


@app.command()
def show(
    run_id: Annotated[str, typer.Argument(help="A run id (or a unique prefix), or 'latest'.")],
    path: Annotated[Optional[Path], typer.Option("--path", help="kollm.yaml or its folder (default: current folder).")] = None,
) -> None:
    """Show one pipeline run: its steps, cache hits, durations, keys, digests and metrics."""
    from kollm.pipeline.history import show_run

    info, steps = show_run(path, run_id)
    out.print(f"[bold]{info.run_id}[/]  {info.status}  started {info.started}  {info.duration}")
    table = Table(title_justify="left")
    for col in ("step", "kind", "status", "cache", "duration", "key", "outputs", "metrics"):
        table.add_column(col, overflow="fold")
    for s in steps:
        table.add_row(s.name, s.kind, s.status, s.cache, s.duration, s.key, s.outputs, s.metrics)
    out.print(table)


@app.command()
def schema() -> None:
    """Print the JSON Schema of kollm.yaml (for editor completion)."""
    from kollm.pipeline.schema import json_schema

    print(json.dumps(json_schema(), indent=2, ensure_ascii=False))


@step_app.command("run")
def step_run(
    step: Annotated[str, typer.Option("--step", help="The step to run.")],
    path: PathArg = None,
    parent_run_id: Annotated[Optional[str], typer.Option(help="Attach to this pipeline MLflow run.")] = None,
    force: Annotated[bool, typer.Option(help="Re-run even if cached.")] = False,
) -> None:
    """Run one step in this process; earlier steps must already be cached."""
    from kollm.pipeline.runner import run

    result = run(path, only=step, force=[step] if force else (), parent_run_id=parent_run_id)
    rec = result.steps[step]
    print(json.dumps({"step": step, "cache_hit": rec.cache_hit, "key": rec.key, "outputs": {k: a.to_json() for k, a in rec.outputs.items()}}))


# --- serve (kollm.serve) ------------------------------------------------------------------------


@app.command("serve")
def serve_cmd(
    model_uri: Annotated[str, typer.Argument(help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/PATH or a local model folder.")],
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 for all interfaces).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[Optional[str], typer.Option(help="Require `Authorization: Bearer KEY` on /v1 routes (default: $KOLLM_API_KEY; unset: no auth).")] = None,
    served_model_name: Annotated[Optional[str], typer.Option(help="The `model` name clients send (default: the registered name or folder name).")] = None,
    backend: Annotated[str, typer.Option(help="auto (vLLM on CUDA when installed), transformers or vllm.")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bfloat16 on CUDA, float32 on CPU), bfloat16, float16 or float32.")] = "auto",
    max_batch_size: Annotated[int, typer.Option(help="Most sequences decoded together.", min=1)] = 32,
    context_length: Annotated[Optional[int], typer.Option(help="Cap on prompt + output tokens (default: the model's).", min=1)] = None,
    graceful_timeout: Annotated[float, typer.Option(help="Seconds to let in-flight requests finish on SIGTERM/Ctrl-C.")] = 30.0,
    project: ProjectOpt = None,
) -> None:
    """Serve a model with an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models, /metrics)."""
    from kollm.serve import serve

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
    )


# --- registry (kollm.registry) ------------------------------------------------------------------

# --- rollout (kollm.rollout) --------------------------------------------------------------------


def main() -> None:
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        app(standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        err.print("aborted")
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(2 if isinstance(e, click.UsageError) else e.exit_code)
    except KollmError as e:
        step = getattr(e, "step", None)
        head = f"step '{step}': " if step and f"'{step}'" not in e.message else ""
        err.print(f"[bold red]error:[/] {escape(head + e.message)}", highlight=False, soft_wrap=True)
        if e.hint:
            err.print(f"  [dim]hint:[/] {escape(e.hint)}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
