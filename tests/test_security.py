"""Security: no code runs from a tampered checkpoint, YAML alias bombs and symlink loops fail fast, and
credentials never appear in messages, logs or MLflow."""

from __future__ import annotations

import json
import os
import random
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kollm.errors import StepFailed
from kollm.train import checkpoint as ckpt


def _tiny_training():
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def _step(model, opt, sched):
    loss = model(torch.randn(3, 4)).pow(2).mean()
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def test_checkpoint_resume_restores_everything_with_weights_only(tmp_path):
    model, opt, sched = _tiny_training()
    _step(model, opt, sched)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = ckpt.TrainState(step=1, epoch=0, offset=3, tokens=12, losses=[0.5])
    path = ckpt.save(tmp_path, model, opt, sched, state)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    weights = {k: v.clone() for k, v in model.state_dict().items()}

    model2, opt2, sched2 = _tiny_training()
    restored = ckpt.load(path, model2, opt2, sched2)
    assert restored == state
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
    for k, v in model2.state_dict().items():
        assert torch.equal(v, weights[k])
    assert sched2.state_dict()["last_epoch"] == sched.state_dict()["last_epoch"]
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_tampered_checkpoint_does_not_run_code(tmp_path):
    model, opt, sched = _tiny_training()
    path = ckpt.save(tmp_path / "ckpt", model, opt, sched, ckpt.TrainState(step=1))
    marker = tmp_path / "pwned"
    blob = torch.load(path / "state.pt", weights_only=True)
    blob["train"]["evil"] = _Payload(marker)
    torch.save(blob, path / "state.pt")
    # the file really is a code-running pickle: an unrestricted load would create the marker
    assert b"system" in (path / "state.pt").read_bytes() or b"posix" in (path / "state.pt").read_bytes()
    with pytest.raises(StepFailed) as err:
        ckpt.load(path, *_tiny_training())
    assert not marker.exists()
    assert "Delete the checkpoint folder" in str(err.value)
    assert str(path) in str(err.value)


# --- YAML alias bombs -------------------------------------------------------------------------------------------


def _alias_bomb(levels: int = 19, width: int = 16) -> str:
    """The 'billion laughs': each level repeats the previous one `width` times (16**19 values from ~3.6 KB)."""
    lines = ["    laugh_0: &laugh_0 [" + ", ".join(['"lol"'] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"    laugh_{i}: &laugh_{i} [" + ", ".join([f"*laugh_{i - 1}"] * width) + "]")
    return "\n".join(lines)


def _bomb_project(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "mysteps.py").write_text("def f(ctx):\n    return {}\n", encoding="utf-8")
    text = (
        "project: bomb\nsteps:\n  - kind: python\n    config:\n      callable: mysteps:f\n      params:\n"
        + "\n".join("    " + line for line in _alias_bomb().splitlines())
        + "\n"
    )
    (root / "kollm.yaml").write_text(text, encoding="utf-8")
    return root


def test_yaml_alias_bomb_fails_fast_in_validate(tmp_path, kollm_bin):
    import subprocess

    root = _bomb_project(tmp_path / "p")
    assert 3000 < len((root / "kollm.yaml").read_bytes()) < 5000
    proc = subprocess.run([kollm_bin, "validate", str(root)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "aliases" in proc.stderr and "alias bomb is refused" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_yaml_aliases_within_the_limit_still_work(tmp_path):
    from kollm.config import safe_load_bounded
    from kollm.errors import ConfigError

    doc = "base: &b {lr: 0.1, steps: [1, 2, 3]}\na: *b\nb: {<<: *b, lr: 0.2}\n"
    assert safe_load_bounded(doc) == {
        "base": {"lr": 0.1, "steps": [1, 2, 3]},
        "a": {"lr": 0.1, "steps": [1, 2, 3]},
        "b": {"lr": 0.2, "steps": [1, 2, 3]},
    }
    assert safe_load_bounded("") is None
    with pytest.raises(ConfigError, match="more than 50"):
        safe_load_bounded(_alias_bomb(levels=3, width=4).replace("    ", ""), max_nodes=50)
    with pytest.raises(ConfigError, match="recursive"):
        safe_load_bounded("a: &a [1, *a]\n")


def test_deeply_nested_yaml_is_one_clear_error_in_validate(tmp_path, kollm_bin):
    import subprocess

    root = tmp_path / "p"
    root.mkdir()
    # 500 levels in about 1 KB (a RecursionError traceback of thousands of lines before)
    (root / "kollm.yaml").write_text("project: deep\nsteps: " + "[" * 500 + "]" * 500 + "\n", encoding="utf-8")
    proc = subprocess.run([kollm_bin, "validate", str(root)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "more than 100 levels deep" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.splitlines()) <= 3, proc.stderr


def test_yaml_depth_counts_aliases_and_allows_what_fits():
    from kollm.config import safe_load_bounded
    from kollm.errors import ConfigError

    def nested(levels: int) -> str:
        return "[" * levels + "1" + "]" * levels

    assert safe_load_bounded("a: " + nested(99)) == {"a": eval(nested(99))}  # 100 levels with the top mapping
    with pytest.raises(ConfigError, match="more than 100 levels deep"):
        safe_load_bounded("a: " + nested(100))
    # each anchor nests the one before: 20 lines of 10 levels are 200 levels once expanded
    chain = "a0: &a0 1\n" + "".join(f"a{i}: &a{i} {'[' * 10}*a{i - 1}{']' * 10}\n" for i in range(1, 21))
    with pytest.raises(ConfigError, match=r"more than 100 levels deep \(at line 1[01],"):
        safe_load_bounded(chain)
    assert safe_load_bounded(chain, max_depth=201)["a1"] == eval(nested(10))


# --- symlink loops under a data glob -----------------------------------------------------------------------------


def _loop_project(root: Path) -> Path:
    (root / "data" / "sub").mkdir(parents=True)
    (root / "data" / "a.txt").write_text("가\n", encoding="utf-8")
    (root / "data" / "sub" / "b.txt").write_text("나\n", encoding="utf-8")
    (root / "data" / "sub" / ".hidden.txt").write_text("x\n", encoding="utf-8")
    os.symlink(".", root / "data" / "self1")
    os.symlink("..", root / "data" / "sub" / "up")
    os.symlink("loop2", root / "data" / "loop1")  # a broken cycle of links
    os.symlink("loop1", root / "data" / "loop2")
    (root / "mysteps.py").write_text("def f(ctx):\n    return {}\n", encoding="utf-8")
    (root / "kollm.yaml").write_text(
        "project: loops\ndata:\n  raw: {path: 'data/**/*.txt'}\n  folder: {path: data}\n"
        "steps:\n  - kind: python\n    inputs: {src: raw}\n    config: {callable: 'mysteps:f', inputs: {src: source}}\n",
        encoding="utf-8",
    )
    return root


def test_symlink_loops_under_a_data_glob_do_not_hang_validate(tmp_path, kollm_bin):
    import subprocess

    root = _loop_project(tmp_path / "p")
    proc = subprocess.run([kollm_bin, "validate", str(root)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr

    from kollm.config import DataSource
    from kollm.pipeline.spec import resolve_source

    files = resolve_source("raw", DataSource(path="data/**/*.txt"), root).meta["files"]
    assert sorted(Path(f).relative_to(root).as_posix() for f in files) == ["data/a.txt", "data/sub/b.txt"]
    files = resolve_source("folder", DataSource(path="data"), root).meta["files"]
    assert sorted(Path(f).relative_to(root).as_posix() for f in files) == ["data/a.txt", "data/sub/b.txt"]


def test_glob_matching_agrees_with_the_standard_glob_without_loops(tmp_path):
    import glob

    from kollm.config import DataSource
    from kollm.pipeline.spec import resolve_source

    for rel in ["d/a.txt", "d/x/b.txt", "d/x/y/c.jsonl", "d/.h/d.txt", "d/x/.e.txt", "d/z1.txt", "d/z2.csv"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "e.txt").write_text("x")
    os.symlink(tmp_path / "outside", tmp_path / "d" / "linked")  # a symlinked folder (no loop) is still followed
    for pattern in ["d/*.txt", "d/**/*.txt", "d/**", "d/*/*.txt", "d/z?.*", "d/[az]*.txt", "d/**/y/*", "d/.h/*"]:
        expected = sorted(p for p in glob.glob(str(tmp_path / pattern), recursive=True) if os.path.isfile(p))
        got = sorted(resolve_source("s", DataSource(path=pattern), tmp_path).meta["files"])
        assert got == expected, pattern


# --- credentials never leave the process ------------------------------------------------------------------------

PLANTED = "Pl4ntedS3cret"


def test_mask_text_and_uri():
    from kollm.redact import mask_text, mask_uri, mask_values

    assert mask_uri(f"postgresql://kollm:{PLANTED}@db:5432/mlflow") == "postgresql://kollm:***@db:5432/mlflow"
    assert mask_uri(f"http://user:{PLANTED}@host:5000/x?y=1") == "http://user:***@host:5000/x?y=1"
    assert (
        mask_uri(f"postgresql://u@h/db?sslmode=require&password={PLANTED}")
        == "postgresql://u@h/db?sslmode=require&password=***"
    )
    assert (
        mask_text(f"failed: https://a:{PLANTED}@h/ and token={PLANTED}; done")
        == "failed: https://a:***@h/ and token=***; done"
    )
    for untouched in [
        "sqlite:////tmp/x.db",
        "http://127.0.0.1:8000/v1",
        "models:/kollm@champion",
        "postgresql://u@h:5432/db",
        "lr=0.1",
    ]:
        assert mask_text(untouched) == untouched
    assert mask_values({"a": [f"s3://k:{PLANTED}@b/x", 1], "b": {"c": f"password={PLANTED}"}}) == {
        "a": ["s3://k:***@b/x", 1],
        "b": {"c": "password=***"},
    }


# Passwords as drivers accept them: SQLAlchemy takes anything but '@' ('/', '?', '#', spaces); urllib takes '@' too.
_SQLA_PASSWORD = st.text(alphabet=string.ascii_letters + string.digits + " /?#:!$%&'()*+,;=~-._[]{}|^`\\", min_size=4)
_HTTP_PASSWORD = st.text(alphabet=string.ascii_letters + string.digits + "@:!$%&'()*+,;=~-._", min_size=4)


@settings(max_examples=300, deadline=None)
@given(password=_SQLA_PASSWORD | _HTTP_PASSWORD)
def test_mask_uri_hides_any_password(password):
    import re

    from hypothesis import assume

    from kollm.redact import mask_text, mask_uri

    tail = " (serving models:/m@champion, see http://h:1/x)"
    for uri, host in [
        ("postgresql://kollm:{}@db:5432/mlflow", "@db:5432/mlflow"),
        ("mysql+pymysql://:{}@10.0.0.7/x?charset=utf8", "@10.0.0.7/x?charset=utf8"),
        ("https://user:{}@mlflow.example:443/", "@mlflow.example:443/"),
    ]:
        assume(password not in uri + tail)  # e.g. "flow" would be found in the host
        assert mask_uri(uri.format(password)) == uri.format("***")
        # one line of an error message, with an alias and another URI after it: masked up to the last '@' before
        # the host, unless the password holds a space then `word:/` (that would look like the next URI)
        if not re.search(r"\s[A-Za-z][A-Za-z0-9+.\-]*:/", password):
            line = mask_text(f"error: cannot open {uri.format(password)}: timeout{tail}")
            assert line == f"error: cannot open {uri.format('***')}: timeout{tail}"


def test_a_password_with_odd_characters_is_masked_in_every_error_the_cli_prints(monkeypatch, capsys):
    """`cli.main` masks the message of any exception it prints, not only a KollmError's."""
    from kollm import cli

    password = "pa ss/wo?rd#1"

    def boom():
        raise RuntimeError(f"(psycopg2.OperationalError) cannot open postgresql://kollm:{password}@db:5432/mlflow")

    monkeypatch.setattr(cli, "app", boom)
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "postgresql://kollm:***@db:5432/mlflow" in err and "wo?rd" not in err and "ss/wo" not in err, err


def _grep_tree(root: Path, needle: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


@pytest.mark.slow(reason="runs a pipeline and the CLI in subprocesses against PostgreSQL")
@pytest.mark.postgres
def test_a_planted_password_appears_in_no_message_log_or_mlflow_record(tmp_path, kollm_bin, postgres_uri):
    import subprocess

    from mlflow import MlflowClient

    from tests.pipeline.helpers import make_project

    secret_uri = postgres_uri.replace(
        "postgresql://postgres@", f"postgresql://postgres:{PLANTED}@"
    )  # trust auth: accepted
    steps = (
        "- kind: python\n  name: corpus\n  inputs: {src: raw}\n"
        "  config: {callable: 'mysteps:make_corpus', inputs: {src: source}, outputs: {data: corpus}, "
        f"params: {{db: '{secret_uri}', auth: 'password={PLANTED}'}}}}\n"
    )
    root = make_project(tmp_path / "p", steps_yaml=steps)
    text = (root / "kollm.yaml").read_text()
    (root / "kollm.yaml").write_text(
        text.replace("project: testproj\n", f"project: testproj\ntracking: {{uri: '{secret_uri}'}}\n")
    )

    def kollm(*args, cwd=root):
        proc = subprocess.run([kollm_bin, *args], capture_output=True, text=True, timeout=300, cwd=cwd)
        assert PLANTED not in proc.stdout + proc.stderr, (args, proc.stdout, proc.stderr)
        return proc

    run = kollm("run")
    assert run.returncode == 0, run.stderr
    shown = kollm("show", run.stdout.strip().split()[-1] if run.stdout.strip() else "latest")
    assert kollm("runs").returncode == 0
    missing = kollm("registry", "show", "no-such-model")
    assert missing.returncode == 4 and "postgres:***@127.0.0.1" in missing.stderr, missing.stderr
    served = kollm("serve", "models:/no-such-model@champion")
    assert served.returncode != 0 and "Traceback" not in served.stderr
    assert shown is not None
    # Under .kollm only the step manifest holds the step's config as written (its `params`, the cache key's input);
    # logs, reports and every other record are clean.
    leaks = _grep_tree(root, PLANTED)
    assert str(root / "kollm.yaml") in leaks and any(p.endswith("step.json") for p in leaks)
    assert [p for p in leaks if not p.endswith(("kollm.yaml", "step.json"))] == []
    assert (root / ".kollm" / "logs").is_dir() and _grep_tree(root / ".kollm" / "logs", PLANTED) == []

    client = MlflowClient(tracking_uri=postgres_uri)
    exp = client.get_experiment_by_name("testproj")
    records = client.search_runs([exp.experiment_id])
    assert len(records) >= 2  # the pipeline run and its step
    for r in records:
        assert PLANTED not in json.dumps({"params": r.data.params, "tags": r.data.tags}), r.data
    step = next(r for r in records if r.data.tags.get("kollm.step") == "corpus")
    assert step.data.params["params.db"].startswith("postgresql://postgres:***@")

    # a connection that fails: the error names the store, masked
    bad = secret_uri.rsplit("/", 1)[0] + "/no_such_database_kollm"
    (root / "kollm.yaml").write_text(
        text.replace("project: testproj\n", f"project: testproj\ntracking: {{uri: '{bad}'}}\n")
    )
    failed = kollm("run")
    assert failed.returncode == 1 and "postgres:***@127.0.0.1:5432/no_such_database_kollm" in failed.stderr, (
        failed.stderr
    )
    assert _grep_tree(root / ".kollm" / "logs", PLANTED) == []
