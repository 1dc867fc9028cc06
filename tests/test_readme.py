"""The README's code blocks: every one is run (in a fresh folder, offline), parsed, or listed below with the reason it
is not run. A new block that is neither fails `test_every_block_is_run_or_skipped_with_a_reason`.

A block is named by its first line less a trailing `  # comment`. YAML blocks are all parsed (fragments of
kollm.yaml included), and the kollm.yaml reference is also checked against kollm's config model. Shell blocks run
under `bash -e` with this environment's `kollm` first on PATH and the hubs offline; python blocks in the test's
own process.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import TRACKING_VARS

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent

# Blocks run by a test here: block name -> the test that runs it.
RUN = {
    "kollm init my-project --example korean-quickstart": "test_quickstart_commands_without_the_pipeline (fast); test_quickstart_end_to_end (slow: all of it)",
    "import kollm": "test_quickstart_end_to_end (slow, in the test's process)",
    "kollm init demo --example korean-quickstart": "test_prepare_only_block",
    "kollm registry list": "test_quickstart_end_to_end (slow)",
}

# Blocks not run: block name -> why.
SKIP = {
    "make demo": "installs the environment and runs the whole suite (the tour's block runs the same demo)",
    "error: kollm.yaml: 2 problems": "sample output of `kollm validate`, not a command",
    "kollm step run kollm.yaml --step prepare-corpus --store s3://bucket/kollm --outputs-json out.json": "needs an S3 bucket (tests/pipeline/test_cli.py runs `kollm step run` on a local store)",
    "kollm serve models:/korean-quickstart@champion": "starts a long-running server (tests/serve/test_cli_shutdown.py runs `kollm serve`)",
    "pip install vllm": "installs vLLM from the network (`make test-vllm` tests that backend)",
    "from openai import OpenAI": "needs a running server (tests/serve/test_openai_client.py runs the openai client)",
    "kollm serve models:/korean-quickstart@champion --canary models:/korean-quickstart@challenger": "starts a long-running gateway (tests/rollout/test_rollout.py runs rollouts end to end)",
    "kollm ui": "starts a long-running web server (tests/ui drives it in a browser)",
    "kollm monitor config ./prom --target kollm-serve=127.0.0.1:8000 --target kollm-monitor=127.0.0.1:9464": "starts Prometheus and the exporter, long-running (tests/monitor/test_prometheus_e2e.py, test_exporter.py)",
    "kollm monitor drift --window 24h": "needs a day of served traffic (tests/monitor/test_drift.py serves some first)",
    "kollm serve models:/korean-quickstart@champion --embedding-model ./model-folder": "starts a long-running server and needs its traffic (tests/monitor/test_drift.py)",
    "kollm watch --once": "posts to a Slack webhook and a gateway, listens for webhooks (tests/monitor/test_watch.py)",
    "ray start --head --port=6379 --ray-client-server-port=10001": "starts a Ray cluster across machines (tests/executors run the ray executor on a local Ray)",
    "docker build -f deploy/docker/Dockerfile -t kollm:0.1.0 .": "needs docker (tests/deploy renders the files and validates them offline)",
    "kubectl create secret generic kollm-s3 --from-literal=AWS_ACCESS_KEY_ID=... "
    "--from-literal=AWS_SECRET_ACCESS_KEY=...": "needs a Kubernetes cluster (tests/deploy/test_validate.py checks the manifests offline)",
    "kollm deploy kserve-canary 4 --steps 20,50": "its patches need a KServe cluster (tests/deploy/test_validate.py runs the command and applies its patches to the rendered InferenceService, checked against the CRD)",
    "kollm validate": "the GitHub Actions jobs' commands, run there against the team's servers (tests/deploy/test_github.py checks the rendered workflow runs exactly these lines)",
    '{"name": "korean-corpus", "expectations": [': "a GX suite, not a command (tests/steps/test_prepare_expectations.py validates data with this very suite through GX)",
    "cd deploy/compose": "needs docker compose (tests/deploy checks the rendered stack offline)",
    "src/kollm/": "the source layout, not a command",
}


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    lang: str
    text: str

    @property
    def first(self) -> str:
        line = next((x for x in self.text.splitlines() if x.strip()), "")
        return re.split(r"\s{2,}#", line)[0].strip()


def readme_blocks() -> list[Block]:
    blocks, lines, i = [], README.read_text(encoding="utf-8").splitlines(), 0
    while i < len(lines):
        fence = re.match(r"^(`{3,})(\S*)", lines[i])
        if fence is None:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith(fence.group(1))), None)
        assert end is not None, f"README.md:{i + 1}: a code block is never closed"
        blocks.append(Block(i + 1, fence.group(2), "\n".join(lines[i + 1 : end]) + "\n"))
        i = end + 1
    return blocks


def block(first: str) -> Block:
    (found,) = [b for b in readme_blocks() if b.first == first]
    return found


def run_shell(text: str, cwd: Path, *, timeout: float = 300) -> str:
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "NO_COLOR": "1",
        "COLUMNS": "200",
    }
    r = subprocess.run(["bash", "-e", "-c", text], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, (
        f"exit {r.returncode}\n--- script\n{text}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}"
    )
    return r.stdout + r.stderr


def without(text: str, *commands: str) -> str:
    """The block's lines less those that start with one of `commands`."""
    return "".join(x for x in text.splitlines(keepends=True) if not x.lstrip().startswith(commands))


def test_every_block_is_run_or_skipped_with_a_reason():
    blocks = readme_blocks()
    named = [b for b in blocks if b.lang != "yaml"]
    unlisted = [f"README.md:{b.line}: {b.first!r}" for b in named if b.first not in RUN and b.first not in SKIP]
    assert unlisted == [], (
        "code blocks neither run nor skipped; add each to RUN (and run it in a test) or to SKIP "
        "with the reason, in tests/test_readme.py:\n  " + "\n  ".join(unlisted)
    )
    firsts = {b.first for b in named}
    stale = sorted((set(RUN) | set(SKIP)) - firsts)
    assert stale == [], f"RUN/SKIP name blocks the README no longer has (update the first line): {stale}"
    assert set(RUN).isdisjoint(SKIP) and all(SKIP.values())
    assert len(firsts) == len(named), "two blocks share a first line; make them distinguishable"


def test_yaml_blocks_parse_and_the_reference_is_a_valid_config():
    from kollm.config import ProjectConfig

    yamls = [b for b in readme_blocks() if b.lang == "yaml"]
    assert len(yamls) >= 5
    for b in yamls:
        try:
            doc = yaml.safe_load(b.text)
        except yaml.YAMLError as e:
            raise AssertionError(f"README.md:{b.line}: not YAML: {e}") from None
        assert doc is not None, f"README.md:{b.line}: an empty YAML block"
    reference = yaml.safe_load(block("project: korean-quickstart").text)
    ProjectConfig.model_validate(reference)


def test_quickstart_commands_without_the_pipeline(tmp_path):
    """The five-minute tour's commands that do not run the pipeline (seconds); the slow test runs all of them."""
    text = block(next(k for k in RUN if k.startswith("kollm init my-project"))).text
    out = run_shell(without(text, "kollm run", "kollm runs", "kollm show"), tmp_path)
    from kollm._version import __version__

    assert __version__ in out and "ok" in out
    schema = (tmp_path / "my-project" / "kollm.schema.json").read_text(encoding="utf-8")
    assert '"steps"' in schema


def test_prepare_only_block(tmp_path):
    run_shell(block("kollm init demo --example korean-quickstart").text, tmp_path)
    assert list((tmp_path / "demo" / ".kollm" / "steps").glob("*/dataset/train.parquet"))


@pytest.mark.slow(reason="the README tour's commands, each a `kollm` process, and the session's quickstart run")
def test_quickstart_end_to_end(tmp_path, quickstart_run, monkeypatch):
    """The tour as written in a fresh folder, then the Python API and the registry commands in the project it made.
    The pipeline is not trained a second time in the session: after `kollm init`, the store gets the finished steps
    of the session's quickstart run (`quickstart_run`: the same files, so the same cache keys) except `register`;
    the first `kollm run` takes those from the cache and registers into this project's own registry, the second is
    all cache hits."""
    init, tour = block(next(k for k in RUN if k.startswith("kollm init my-project"))).text.split("\n", 1)
    run_shell(init, tmp_path)
    source, first = quickstart_run
    for rec in first.steps.values():
        if rec.kind != "register":
            shutil.copytree(
                source / ".kollm" / "steps" / rec.key, tmp_path / "my-project" / ".kollm" / "steps" / rec.key
            )
    out = run_shell(tour, tmp_path, timeout=1500)
    done = re.findall(r"done\W+run \w+ \W+ (\d+) steps, (\d+) cached", out)
    n = len(first.steps)
    assert done[0] == (str(n), str(n - 1)), done  # register ran here
    assert len(done) == 2 and done[1][0] == done[1][1] != "0", done  # "again: every step is a cache hit"
    monkeypatch.chdir(tmp_path)  # the Python block, in this process (as a user's script or notebook runs it)
    names: dict = {}
    exec(compile(block("import kollm").text, "README.md", "exec"), names)
    result = names["result"]
    assert result.status == "FINISHED" and all(s.cache_hit for s in result.steps.values()), result
    assert len(names["pipe"].steps) == n
    for k in TRACKING_VARS:  # kollm.run pointed this process at the project's store: the CLI below finds it itself
        os.environ.pop(k, None)
    # The registry block assumes a champion and a newer challenger: promote v1, then register v2 (a register step
    # with another description has another cache key, so only it runs again and makes a new version).
    project = tmp_path / "my-project"
    run_shell('kollm registry promote -m "first champion"', project)
    config = project / "kollm.yaml"
    assert config.read_text(encoding="utf-8").rstrip().endswith("- kind: register")
    config.write_text(
        config.read_text(encoding="utf-8").rstrip() + '\n    config: {description: "a second run"}\n', encoding="utf-8"
    )
    run_shell("kollm run", project)
    registry = run_shell(block(next(k for k in RUN if k.startswith("kollm registry list"))).text, project)
    assert "champion -> v2" in registry and "champion -> v1" in registry  # promoted, then rolled back


def test_setup_says_to_activate_the_venv_that_make_demo_creates():
    """Found: after `make demo`, the README's next command (`kollm init`) failed in a fresh shell: nothing said to
    activate .venv."""
    venv = re.search(r"^VENV \?= (\S+)$", (ROOT / "Makefile").read_text(encoding="utf-8"), re.M).group(1)
    setup = block("make demo").text
    assert f"source {venv}/bin/activate" in setup
    tour = README.read_text(encoding="utf-8").split("## Five-minute tour")[0]
    assert f"`{venv}/bin/kollm`" in tour
