"""A Ray worker node lost mid-training: the step's checkpoints live in the s3:// artifact store (moto's S3 server on
loopback), so the training resumes on another node from the last checkpoint, not from step 0.

The cluster is two `ray start` nodes of this machine, each with its own temp folder (and TMPDIR, where a worker keeps
its scratch copy of the checkpoints): a head with no CPUs (the driver's coordinating tasks, which reserve none) and
a worker node with one CPU, where Ray Train's worker runs. Once the first checkpoint is in the store, every process
of the worker node is killed; a fresh worker node joins and the step finishes there."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from tests.tiny import save_tiny

ROOT = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).with_name("ray")
MAX_STEPS = 300
EVERY = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_env(temp: Path, s3: dict[str, str], home: Path) -> dict[str, str]:
    paths = [str(ROOT / "src"), str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    # no RAY_*: a ray.init earlier in this process (the session's Ray instance) sets RAY_AUTH_MODE=token and others,
    # which would make these nodes look for a token. HOME: Ray reads ~/.ray (an auth token another cluster of this
    # machine may have left there); this one has its own
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "KOLLM_", "RAY_"))}
    return {
        **env,
        **s3,
        "HOME": str(home),
        "TMPDIR": str(temp),
        "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths)),
    }


def start_node(temp: Path, s3: dict[str, str], *args: str) -> None:
    temp.mkdir(parents=True, exist_ok=True)
    for _ in range(2):  # on a loaded machine a node may miss its registration deadline once
        done = subprocess.run(
            [str(RAY), "start", f"--temp-dir={temp}", "--disable-usage-stats", *args],
            env=node_env(temp, s3, temp.parent),
            capture_output=True,
            text=True,
            timeout=180,
        )
        if done.returncode == 0:
            return
        kill_node(temp)
    raise AssertionError(f"ray start {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")


def node_processes(temp: Path) -> list:
    """Every process of the node whose temp folder is `temp` (its daemons name the folder), with their children."""
    import psutil

    found = {}
    for p in psutil.process_iter(["cmdline"]):
        if any(str(temp) in part for part in p.info["cmdline"] or ()):
            found[p.pid] = p
            for child in p.children(recursive=True):
                found[child.pid] = child
    return list(found.values())


def kill_node(temp: Path) -> int:
    procs = node_processes(temp)
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except Exception:  # gone already
            pass
    return len(procs)


def remote_steps(fs, root: str) -> list[int]:
    fs.invalidate_cache()
    return sorted(int(p.split("/")[-2].removeprefix("step-")) for p in fs.glob(f"{root}/checkpoints/*/step-*/state.pt"))


@pytest.mark.postgres
@pytest.mark.slow(
    reason="two `ray start` nodes, a third after the kill, and Ray Train started up to three times: 4-8 minutes on the "
    "loaded 2-core machine"
)
def test_lost_worker_node_resumes_from_the_checkpoint_in_the_store(tmp_path, postgres_uri):
    s3fs = pytest.importorskip("s3fs", reason="s3fs is not installed: pip install 'kollm[s3]'")
    server_mod = pytest.importorskip("moto.server", reason="moto[server] is not installed")
    pytest.importorskip("psutil")
    port = free_port()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    s3 = {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    fs = s3fs.S3FileSystem(key="test", secret="test", endpoint_url=s3["AWS_ENDPOINT_URL"])
    bucket = f"kollm-lost-{uuid.uuid4().hex[:8]}"  # moto's buckets live in the process: another test's may be there
    fs.mkdir(bucket)
    temps = Path(tempfile.mkdtemp(prefix="kr", dir="/tmp"))  # Ray's socket paths must stay short
    head, lost, spare = temps / "h", temps / "a", temps / "b"
    gcs = free_port()
    driver = None
    try:
        root = tmp_path / "p"
        (root / "data").mkdir(parents=True)
        rows = [
            {"messages": [{"role": "user", "content": f"질문 {i}"}, {"role": "assistant", "content": f"대답 {i}"}]}
            for i in range(40)
        ]
        (root / "data" / "chat.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
        save_tiny(root / "base")
        (root / "kollm.yaml").write_text(
            textwrap.dedent(f"""\
            project: lostnode
            tracking: {{uri: '{postgres_uri}'}}
            data: {{chat: {{path: data/chat.jsonl}}}}
            steps:
              - {{kind: prepare, name: prep, config: {{dataset: instructions, split: {{eval_fraction: 0.1}}, filters: {{min_chars: 1, min_hangul_ratio: 0}}}}}}
              - kind: sft
                name: tune
                retries: 2
                retry_backoff_s: 1
                config: {{base_model: base, seq_len: 32, max_steps: {MAX_STEPS}, batch_size: 2, checkpoint_every: {EVERY}, log_every: {EVERY}}}
            """)
        )
        # the data step first, locally into the same store: the cluster run finds it cached and trains
        prep = subprocess.run(
            [sys.executable, "-m", "kollm.cli", "run", "--only", "prep", "--store", f"s3://{bucket}/store"],
            cwd=root,
            env=node_env(temps, s3, temps),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert prep.returncode == 0, prep.stdout[-2000:] + prep.stderr[-2000:]
        start_node(
            head,
            s3,
            "--head",
            f"--port={gcs}",
            f"--ray-client-server-port={free_port()}",
            "--num-cpus=0",
            "--include-dashboard=false",
        )
        start_node(lost, s3, f"--address=127.0.0.1:{gcs}", "--num-cpus=1")
        log = (tmp_path / "driver.log").open("w")
        driver = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kollm.cli",
                "run",
                "--executor",
                "ray",
                "--address",
                f"127.0.0.1:{gcs}",
                "--store",
                f"s3://{bucket}/store",
            ],
            cwd=root,
            env=node_env(temps, s3, temps),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 240
        while not remote_steps(fs, f"{bucket}/store"):
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint reached the store"
            time.sleep(0.2)
        assert kill_node(lost) > 0
        time.sleep(1)
        at_kill = remote_steps(fs, f"{bucket}/store")
        assert at_kill and max(at_kill) < MAX_STEPS
        start_node(spare, s3, f"--address=127.0.0.1:{gcs}", "--num-cpus=1")
        rc = driver.wait(timeout=400)
        output = (tmp_path / "driver.log").read_text()
        assert rc == 0, output[-3000:]
        lineage = [json.loads(fs.cat(p)) for p in fs.glob(f"{bucket}/store/objects/*/*/model/kollm.json")]
        assert len(lineage) == 1, output[-3000:]
        training = lineage[0]["training"]
        assert training["resumed_from"] == max(at_kill), (training, at_kill, output[-3000:])
        assert training["steps"] == MAX_STEPS
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
        for temp in (spare, lost, head):
            kill_node(temp)
        server.stop()
        shutil.rmtree(temps, ignore_errors=True)
