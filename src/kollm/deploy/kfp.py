"""`kollm compile kfp`: kollm.yaml -> a Kubeflow Pipelines (KFP 2.17) pipeline IR file.

One lightweight component per step. Each runs exactly one attempt of its step with explicit inputs (the command
line is built by `kollm.deploy.command.step_command`, whose source each component carries):

    python -m kollm.cli step run kollm.yaml --step NAME --input NAME=URI ... --attempt 0 --store URL --outputs-json FILE

and returns its outputs' URIs in the store as string parameters, which the next components take as their
inputs (plus `kollm_outputs`: the whole outputs JSON, with digests and the cache hit). A step's resources become set_cpu_limit / set_memory_limit / set_accelerator_type+limit, its retries
set_retry with exponential backoff. Caching: kollm's key is a digest of the config, the input digests and the
code; the components' inputs are the config text, the image (the code) and content-addressed artifact URIs, so
KFP's cache key covers the same things, and KFP caching is on. A step that reads a raw data source (whose URI
does not change when its bytes do) has KFP caching off; kollm's own cache in the store still skips its work
when nothing changed. A Ray-sized step (more than one GPU, or named with --ray) is a component that submits a
KubeRay RayJob (ray.io/v1) running the same command on a Ray cluster and waits for it.

kfp is imported only here (`pip install 'kollm[kfp]'`).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import yaml

from kollm.deploy.command import SOURCE as STEP_COMMAND
from kollm.deploy.k8s import cluster_config, cpu_quantity, kollm_env, ray_job, settings_name
from kollm.deploy.options import DeployOptions, Project, load_project
from kollm.errors import ConfigError, KollmError
from kollm.pipeline.spec import ResolvedStep

RESULT_FILE = "/tmp/kollm-outputs.json"


def ident(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower())


def _step_function(step: ResolvedStep, ray: bool) -> str:
    """Python source of the step's component function (kfp reads its signature and ships its source)."""
    fn = ("rayjob_" if ray else "step_") + ident(step.name)
    params = [f"in_{ident(n)}: str" for n in step.inputs] + ["kollm_yaml: str", "store: str", "project_dir: str"]
    if ray:
        params += ["rayjob_manifest: str", "namespace: str"]
    outs = ", ".join([f'("{ident(o)}", str)' for o in step.outputs] + ['("kollm_outputs", str)'])
    inputs = "{" + ", ".join(f'"{n}": in_{ident(n)}' for n in step.inputs) + "}"
    returns = "(" + "".join(f'result["outputs"]["{o}"]["uri"], ' for o in step.outputs) + "json.dumps(result))"
    if ray:
        body = RAY_BODY
    else:
        body = LOCAL_BODY
    return f"def {fn}({', '.join(params)}) -> NamedTuple('Outputs', [{outs}]):\n" + textwrap.indent(
        body.format(
            step=step.name,
            inputs=inputs,
            returns=returns,
            result_file=RESULT_FILE,
            env_prefix="KOLLM_INPUT_",
            step_command=STEP_COMMAND,
        ),
        "    ",
    )


LOCAL_BODY = '''\
"""Run one attempt of step {step!r} with explicit inputs; return its outputs' URIs."""
import json, pathlib, subprocess, sys, tempfile
work = pathlib.Path(tempfile.mkdtemp(prefix="kollm-{step}-"))
if project_dir:
    config = pathlib.Path(project_dir) / "kollm.yaml"
else:
    config = work / "kollm.yaml"
    config.write_text(kollm_yaml, encoding="utf-8")
out = work / "outputs.json"
{step_command}
# an empty data_NAME (the default) leaves the raw source to kollm.yaml
cmd = step_command([sys.executable, "-m", "kollm.cli"], str(config), {step!r}, {inputs}, 0, str(out), store)
print(" ".join(cmd), flush=True)
subprocess.run(cmd, check=True)
result = json.loads(out.read_text(encoding="utf-8"))
print(json.dumps(result), flush=True)
return {returns}
'''

RAY_BODY = '''\
"""Submit step {step!r} as a KubeRay RayJob, wait for it, and return its outputs' URIs (read from the store)."""
import json, time, uuid
import fsspec
from kubernetes import client, config
config.load_incluster_config()
job = json.loads(rayjob_manifest)
name = job["metadata"]["name"] + "-" + uuid.uuid4().hex[:8]
job["metadata"]["name"] = name
result_uri = store.rstrip("/") + "/kfp-results/" + name + ".json"
env = {{"{env_prefix}" + "".join(c if c.isalnum() else "_" for c in k.upper()): v for k, v in {inputs}.items() if v}}
env["KOLLM_RESULT_URI"] = result_uri
job["spec"]["runtimeEnvYAML"] = json.dumps({{"env_vars": env}})  # JSON is YAML
api = client.CustomObjectsApi()
api.create_namespaced_custom_object("ray.io", "v1", namespace, "rayjobs", job)
print("submitted RayJob", name, flush=True)
while True:
    status = api.get_namespaced_custom_object("ray.io", "v1", namespace, "rayjobs", name).get("status", {{}})
    if status.get("jobStatus") == "SUCCEEDED":
        break
    if status.get("jobStatus") in ("FAILED", "STOPPED") or status.get("jobDeploymentStatus") == "Failed":
        raise RuntimeError("RayJob " + name + " ended " + json.dumps(status))
    time.sleep(10)
with fsspec.open(result_uri, "r") as f:
    result = json.load(f)
print(json.dumps(result), flush=True)
return {returns}
'''


def is_ray_sized(step: ResolvedStep, ray_steps: set[str]) -> bool:
    return step.name in ray_steps or step.resources.gpus > 1


def kfp_rayjob(p: Project, step: ResolvedStep) -> dict[str, Any]:
    """The RayJob the component submits: runs at once, inputs and the result URI come as runtime env vars, and
    the driver copies its outputs JSON into the store for the component to read."""
    job = ray_job(p, step)
    job["spec"]["suspend"] = False
    job["spec"]["entrypoint"] += (
        f" && python -c \"import fsspec, os; fsspec.open(os.environ['KOLLM_RESULT_URI'], 'w')"
        f".open().write(open('{RESULT_FILE}').read())\""
    )
    env, _ = kollm_env(p)
    for group in [job["spec"]["rayClusterSpec"]["headGroupSpec"], *job["spec"]["rayClusterSpec"]["workerGroupSpecs"]]:
        for c in group["template"]["spec"]["containers"]:
            c["env"] = list(env)  # no ConfigMap inputs: the component passes them
    return job


def compile_kfp(
    path: str | Path | None,
    out_file: str | Path,
    *,
    image: str,
    options: DeployOptions | None = None,
    ray_steps: tuple[str, ...] = (),
    project_dir: str = "",
    namespace: str = "kubeflow",
    install_kfp_package: bool = True,
) -> Path:
    """Write the pipeline IR YAML for kollm.yaml at PATH. Returns the file. `install_kfp_package=False`: the
    components do not `pip install kfp` before they run (for an image, or a kfp.local run, that already has it)."""
    if importlib.util.find_spec("kfp") is None:
        raise KollmError("kfp is not installed", hint="pip install 'kollm[kfp]' (kfp 2.17)")
    opts = options or DeployOptions()
    p = load_project(path, DeployOptions(**{**opts.__dict__, "image": image}))
    names = {s.name for s in p.pipeline.steps}
    unknown = [r for r in ray_steps if r not in names]
    if unknown:
        raise ConfigError(f"--ray: no step named {', '.join(map(repr, unknown))}; steps: {', '.join(sorted(names))}")
    try:
        from kfp import compiler, dsl, kubernetes
    except ImportError as e:  # kfp without kfp-kubernetes (`pip install kfp`), or a kfp of another version
        raise KollmError(
            f"kollm compile kfp needs kfp and kfp-kubernetes: {e}",
            hint="pip install 'kollm[kfp]' (kfp 2.17 and kfp-kubernetes 2.17)",
        ) from None

    ray = {s.name for s in p.pipeline.steps if is_ray_sized(s, set(ray_steps))}
    with tempfile.TemporaryDirectory(prefix="kollm-kfp-") as tmp:
        module = _write_module(Path(tmp), p, ray)
        components = {}
        for s in p.pipeline.steps:
            fn = getattr(module, ("rayjob_" if s.name in ray else "step_") + ident(s.name))
            packages = ["kubernetes", "fsspec", "s3fs"] if s.name in ray else []
            components[s.name] = dsl.component(
                base_image=image, packages_to_install=packages, install_kfp_package=install_kfp_package
            )(fn)

        sources = sorted(p.pipeline.cfg.data)

        signature = _signature(p, sources, project_dir, namespace)

        def pipeline_body(*args: Any, **kwargs: Any) -> None:
            params = signature.bind(*args, **kwargs).arguments
            produced: dict[str, Any] = {}
            for s in p.pipeline.steps:
                task_args: dict[str, Any] = {
                    "kollm_yaml": params["kollm_yaml"],
                    "store": params["store"],
                    "project_dir": params["project_dir"],
                }
                for name, ref in s.inputs.items():
                    task_args[f"in_{ident(name)}"] = (
                        params[f"data_{ident(ref.source)}"]
                        if ref.source
                        else produced[ref.step or ""].outputs[ident(ref.output or "")]
                    )
                if s.name in ray:
                    task_args["rayjob_manifest"] = json.dumps(kfp_rayjob(p, s))
                    task_args["namespace"] = params["namespace"]
                task = components[s.name](**task_args).set_display_name(s.name)
                _configure(task, p, s, s.name in ray, kubernetes)
                produced[s.name] = task

        pipeline_body.__signature__ = signature  # type: ignore[attr-defined]
        pipeline_body.__name__ = p.slug.replace("-", "_")
        pipeline = dsl.pipeline(
            name=p.slug, description=f"kollm pipeline {p.name} (compiled from {p.pipeline.file.name})"
        )(pipeline_body)
        out = Path(out_file)
        out.parent.mkdir(parents=True, exist_ok=True)
        compiler.Compiler().compile(pipeline, package_path=str(out))
    sys.modules.pop(module.__name__, None)
    return out


def _write_module(folder: Path, p: Project, ray: set[str]):
    source = "from typing import NamedTuple\n\n\n" + "\n\n".join(
        _step_function(s, s.name in ray) for s in p.pipeline.steps
    )
    file = folder / f"kollm_kfp_{ident(p.slug)}.py"
    file.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location(file.stem, file)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[file.stem] = module  # inspect.getsource needs the module registered
    spec.loader.exec_module(module)
    return module


def _signature(p: Project, sources: list[str], project_dir: str, namespace: str):
    import inspect

    P = inspect.Parameter
    # kollm.yaml as one line of JSON (which is YAML): kfp copies defaults into the IR's header comment, where a
    # multi-line string would break the YAML; artifacts go through the MLflow server as in the cluster manifests
    config = json.dumps(yaml.safe_load(cluster_config(p)), ensure_ascii=False)
    params = [
        P("kollm_yaml", P.POSITIONAL_OR_KEYWORD, default=config, annotation=str),
        P("store", P.POSITIONAL_OR_KEYWORD, default=p.store, annotation=str),
        P("project_dir", P.POSITIONAL_OR_KEYWORD, default=project_dir, annotation=str),
        P("namespace", P.POSITIONAL_OR_KEYWORD, default=namespace, annotation=str),
    ]
    params += [P(f"data_{ident(s)}", P.POSITIONAL_OR_KEYWORD, default="", annotation=str) for s in sources]
    return inspect.Signature(params)


def _configure(task: Any, p: Project, s: ResolvedStep, ray: bool, kubernetes: Any) -> None:
    """Resources, retries, caching and the environment (Secrets and the settings ConfigMap, by name)."""
    r = s.resources
    if not ray:  # a RayJob component only waits; the Ray cluster holds the step's resources
        task.set_cpu_limit(cpu_quantity(r.cpus)).set_memory_limit(r.memory or "8Gi")
        if r.gpus:
            task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(r.gpus)
    if s.retries:
        task.set_retry(num_retries=s.retries, backoff_duration=f"{int(s.retry_backoff_s)}s", backoff_factor=2.0)
    task.set_caching_options(enable_caching=not any(ref.source for ref in s.inputs.values()))
    kubernetes.use_secret_as_env(
        task,
        secret_name=p.options.s3_secret,
        secret_key_to_env={"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"},
    )
    kubernetes.use_config_map_as_env(
        task, config_map_name=settings_name(p), config_map_key_to_env={"MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI"}
    )
    kubernetes.add_pod_label(task, "app.kubernetes.io/instance", p.slug)
    kubernetes.add_pod_annotation(task, "kollm.dev/step", s.name)
