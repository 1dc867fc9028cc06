"""Deployment files from kollm.yaml: `kollm deploy render --target k8s|kserve|github|compose|docker PATH -o DIR`.

    render(path, target, out_dir, options)  writes the files, returns their paths
    DeployOptions                           image, store, Secret names, serving and rollout settings

k8s: KubeRay RayJobs (one per cpt/sft/align step), a RayService running kollm's OpenAI app on Ray Serve, an Argo
Rollout of `kollm serve` pods with an AnalysisTemplate over kollm's own metrics, MLflow on PostgreSQL with S3
artifacts, Prometheus scrape config, Services and ConfigMaps. kserve: a ServingRuntime, an InferenceService and its
canary, an LLMInferenceService on vLLM. github: .github/workflows/kollm.yml. compose: the single-box stack. docker: the image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from kollm.deploy.options import DeployOptions, Project, load_project
from kollm.errors import ConfigError

Target = Literal["k8s", "kserve", "github", "compose", "docker"]
TARGETS: tuple[Target, ...] = ("k8s", "kserve", "github", "compose", "docker")

__all__ = ["DeployOptions", "Project", "TARGETS", "load_project", "render", "render_files"]


def render_files(
    path: str | Path | None, target: str, out_dir: Path, options: DeployOptions | None = None
) -> dict[str, str]:
    """{relative file name: text} for TARGET, without writing anything."""
    if target not in TARGETS:
        raise ConfigError(f"--target: expected one of {', '.join(TARGETS)}, got {target!r}")
    if target == "docker":
        from kollm.deploy.docker import render_docker

        load_project(path, options or DeployOptions())  # the same checks as the other targets
        return render_docker()
    p = load_project(path, options or DeployOptions())
    if target == "k8s":
        from kollm.deploy.k8s import render_k8s, yaml_docs

        return {name: yaml_docs(docs) for name, docs in render_k8s(p).items()}
    if target == "kserve":
        from kollm.deploy.k8s import yaml_docs
        from kollm.deploy.kserve import render_kserve

        return {name: yaml_docs(docs) for name, docs in render_kserve(p).items()}
    if target == "github":
        from kollm.deploy.github import render_github
        from kollm.deploy.k8s import yaml_text

        return {name: yaml_text(doc) for name, doc in render_github(p).items()}
    from kollm.deploy.compose import render_compose

    return render_compose(p, out_dir)


def render(
    path: str | Path | None, target: str, out_dir: str | Path, options: DeployOptions | None = None
) -> list[Path]:
    """Write TARGET's files under OUT_DIR (created); files of earlier renders with other names are left alone."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"-o {out}: exists and is not a folder")
    files = render_files(path, target, out, options)
    written = []
    for name, text in files.items():
        dest = out / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(dest)
        written.append(dest)
    return written
