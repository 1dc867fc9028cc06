"""Dockerfiles of the kollm image (CPU and CUDA). Build them from the kollm source tree (the folder holding
pyproject.toml); the project's kollm.yaml is not baked in: Kubernetes mounts it from a ConfigMap, compose from a
bind mount."""

from __future__ import annotations

_HEAD = """\
# The kollm image ({variant}). Build from the kollm source tree (the folder with pyproject.toml):
#   docker build -f deploy/docker/{file} -t {tag} .
# It holds kollm with its Ray, S3 and JSON (xgrammar) extras, the MLflow server and boto3 (MLflow's S3 artifact
# client). The same image runs `kollm serve`, `kollm step run` in RayJobs, the Ray Serve app and `mlflow server`.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/kollm

"""

_TAIL = """\
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install ".[ray,s3,json]" boto3{extra}

RUN useradd --create-home --uid 1000 kollm && mkdir -p /project && chown kollm /project
USER kollm
WORKDIR /project
EXPOSE 8000
ENTRYPOINT ["kollm"]
CMD ["--help"]
"""

CPU = (
    _HEAD.format(variant="CPU", file="Dockerfile", tag="kollm:0.1.0")
    + """\
# torch first, from PyTorch's CPU wheel index: the PyPI wheel would pull several GB of CUDA libraries
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

"""
    + _TAIL.format(extra="")
)

CUDA = (
    _HEAD.format(
        variant="CUDA: run it on nodes with the NVIDIA driver and device plugin",
        file="Dockerfile.cuda",
        tag="kollm:0.1.0-cuda",
    )
    + """\
# torch first: the PyPI wheel bundles the CUDA runtime libraries, so no CUDA base image is needed
RUN pip install torch==2.13.0
# EXTRA_PIP=vllm adds the vLLM serving backend (`kollm serve --backend auto` then uses it on a GPU); check that the
# vLLM release you pick supports torch 2.13.0 first, or it replaces torch.
ARG EXTRA_PIP=""

"""
    + _TAIL.format(extra=" $EXTRA_PIP")
)


def render_docker() -> dict[str, str]:
    return {"Dockerfile": CPU, "Dockerfile.cuda": CUDA}
