"""`evaluate`: perplexity on the held-out split, generation suites, optional lm-eval tasks, and the quality gate.

    - kind: evaluate
      inputs: {suite: eval_suite}          # a data source with the suite JSONL (only with `generation:`)
      config:
        generation: {metrics: [contains, chrf], max_new_tokens: 32}
        gate:
          - perplexity <= 60
          - contains >= 0.5
          - perplexity <= champion * 1.05  # relative: at most 5 % worse than the current champion

Inputs: `model` (default: the latest model), `data` (default: the latest corpus or instructions dataset; its
eval.parquet is scored) and, with `generation:`, `suite` (a data source). The same evaluation runs on the
registered `champion` (and any alias a rule names), so the report and relative rules compare both on the same
eval set; results are cached per model digest and eval-set digest in .kollm/eval-cache/.

Perplexity over instructions scores assistant tokens only (`perplexity_targets: assistant`, what SFT trains)
or the whole chat-templated text (`all`). Outputs: `metrics` (metrics.json: candidate and champion metrics,
the gate decision with every reason) and `report` (report.html). A failed gate logs everything, then raises
GateFailed (exit code 3), so nothing after it (`register`) runs.

With `judge:` (kollm.eval.judge), an LLM judge reads the suite's prompts and answers: `judge_score` (1-10),
`judge_win_rate` against the `judge.compare_to` alias's answers, `judge_parse_failures` and
`judge_request_failures` join the metrics; per-case verdicts with reasons go into the report, report.json, and the
step's MLflow run (the table evaluation/judge.json, and one trace per case with the verdicts as LLM-judge
assessments). A `models:/` judge is served by kollm on a free 127.0.0.1 port while it judges.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field, model_validator

from kollm.errors import ConfigError, GateFailed, NotFound, StepFailed
from kollm.eval.gate import check_rule
from kollm.eval.harness import LmEvalConfig
from kollm.eval.judge import JudgeConfig
from kollm.pipeline.step import STRICT, Artifact, InputSpec, StepContext, StepResult

KIND = "evaluate"
EVAL_CODE = ("kollm.eval.perplexity", "kollm.eval.generation", "kollm.eval.harness")
SCORE_DIGEST_TAG = "kollm.model_digest"  # set by `register` on every version


class GenerationConfig(BaseModel):
    model_config = STRICT
    metrics: list[Literal["exact", "contains", "chrf", "regex"]] = Field(
        ["exact", "contains", "chrf"],
        min_length=1,
        description="Metrics for suite cases that name none: exact, contains, chrf, regex.",
    )
    max_new_tokens: int = Field(64, gt=0, le=4096, description="Tokens to generate per case (greedy).")
    batch_size: int = Field(8, gt=0, description="Prompts generated together (left-padded).")
    chat: bool | None = Field(
        None, description="Render string prompts with the chat template. Default: when the tokenizer has one."
    )
    limit: int | None = Field(None, gt=0, description="Use only the first N cases (quick checks).")


class Config(BaseModel):
    model_config = STRICT
    perplexity: bool = Field(
        True, description="Score perplexity on the `data` input's eval.parquet (when one is wired)."
    )
    perplexity_targets: Literal["assistant", "all"] = Field(
        "assistant",
        description="Instructions data: score assistant replies only (as SFT trains) or the whole chat-templated text.",
    )
    max_length: int = Field(
        1024, gt=1, description="Tokens per scored sequence; longer documents are scored in windows."
    )
    batch_size: int = Field(4, gt=0, description="Sequences per forward pass for perplexity.")
    max_eval_rows: int | None = Field(
        2000, gt=0, description="Score at most this many held-out rows (the first ones). null: all."
    )
    generation: GenerationConfig | None = Field(None, description="Run the generation suite from the `suite` input.")
    lm_eval: LmEvalConfig | None = Field(None, description="lm-evaluation-harness tasks (needs `pip install lm-eval`).")
    judge: JudgeConfig | None = Field(
        None, description="An LLM judge of the generation suite's answers (scores, pairwise vs the champion)."
    )
    gate: list[Annotated[str, AfterValidator(check_rule)]] = Field(
        default_factory=list,
        description='Gate rules, each "METRIC OP BOUND": "perplexity <= 40", "contains >= 0.85", "chrf >= champion + 1". '
        "All must hold or the pipeline stops before `register`.",
    )
    require_champion: bool = Field(
        False, description="Fail relative rules (instead of skipping them) while no champion exists."
    )
    compare_to: list[str] = Field(
        ["champion"], description="Registered-model aliases to evaluate side by side with the candidate."
    )
    registered_model: str | None = Field(
        None, description="The registered model whose aliases are compared. Default: the project name."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where to run the models. auto: cuda when available."
    )

    @model_validator(mode="after")
    def _judge_reads_the_suite(self) -> Config:
        if self.judge is not None and self.generation is None:
            raise ValueError("judge: needs `generation:` (the judge reads the suite's prompts and the answers to them)")
        return self

    def aliases(self, rules: list[Any]) -> list[str]:
        """The registered-model aliases evaluated beside the candidate: compare_to, the judge's, the rules'."""
        judged = [self.judge.compare_to] if self.judge is not None else []
        return list(dict.fromkeys([*self.compare_to, *judged, *(r.alias for r in rules if r.alias)]))


def inputs(config: Config) -> dict[str, InputSpec]:
    specs = {
        "model": InputSpec(("model",), help="The candidate model."),
        "data": InputSpec(
            ("corpus", "instructions"), optional=True, help="A dataset whose eval.parquet is scored for perplexity."
        ),
    }
    if config.generation is not None:
        specs["suite"] = InputSpec(("source",), help="A data source with the suite JSONL (prompt, expected, metric).")
    return specs


def outputs(config: Config) -> dict[str, str]:
    return {"metrics": "metrics", "report": "report"}


def code(config: Config) -> tuple[str, ...]:
    return ("kollm.steps.evaluate", "kollm.eval")


def references(config: Config, project_dir: Path) -> dict[str, str]:
    """The registry versions the compared aliases point at: when `champion` moves, the evaluation (and any gate
    rule relative to it) is made again instead of coming from the cache."""
    from kollm.config import load_config
    from kollm.eval.gate import parse_rule
    from kollm.pipeline.sqlite_runs import alias_versions
    from kollm.pipeline.tracking import tracking_uri

    name = config.registered_model or load_config(project_dir)[0].project
    refs = _judge_references(config.judge, project_dir) if config.judge is not None else {}
    aliases = config.aliases([parse_rule(r) for r in config.gate])
    if not aliases:
        return refs
    versions = alias_versions(tracking_uri(project_dir), name, aliases)
    if versions is None:  # not a SQLite store kollm can read directly: ask MLflow
        from kollm import registry

        versions = registry.alias_versions(name, aliases, project_dir)
    return refs | {f"registry:{name}@{alias}": version or "none" for alias, version in versions.items()}


def _judge_references(judge: JudgeConfig, project_dir: Path) -> dict[str, str]:
    """The rubric's content and, for a registered judge, the version its URI names: a new rubric or judge version
    judges again instead of coming from the cache."""
    from kollm.eval.judge import load_rubric
    from kollm.pipeline.artifacts import json_digest

    refs = {"judge-rubric": json_digest(load_rubric(judge.rubric, project_dir).model_dump(mode="json"))}
    if judge.model.startswith("models:/"):
        from kollm import registry

        rest = judge.model.removeprefix("models:/").rstrip("/")
        if "@" in rest:
            judge_name, alias = rest.split("@", 1)
            version = registry.alias_versions(judge_name, [alias], project_dir)[alias]
            refs[f"judge:{judge.model}"] = version or "none"
    return refs


# --- what gets evaluated ----------------------------------------------------------------------------------


def _eval_rows(data: Artifact, limit: int | None) -> tuple[str, list[Any]]:
    import pandas as pd

    path = data.folder() / "eval.parquet"
    if not path.is_file():
        raise StepFailed(
            f"the {data.type} dataset {data.path} has no eval.parquet", hint="set eval_fraction in the prepare step"
        )
    column = "text" if data.type == "corpus" else "messages"
    frame = pd.read_parquet(path, columns=[column])
    values = list(frame[column][:limit] if limit else frame[column])
    if column == "messages":
        values = [[{"role": str(m["role"]), "content": str(m["content"])} for m in conv] for conv in values]
    return column, values


def _suite_files(suite: Artifact) -> list[Path]:
    files = [Path(f) for f in suite.meta.get("files", []) if str(f).endswith((".jsonl", ".json"))]
    if not files:
        raise ConfigError(
            f"inputs.suite: the data source '{suite.meta.get('name')}' has no .jsonl file",
            hint="point it at the suite JSONL",
        )
    return files


def _load_cases(files: list[Path], limit: int | None) -> list[Any]:
    from kollm.eval.generation import load_suite

    cases = []
    for f in files:
        for case in load_suite(f):
            cases.append(case if len(files) == 1 else case.model_copy(update={"id": f"{f.stem}:{case.id}"}))
    return cases[:limit] if limit else cases


def _expected_metrics(cfg: Config, has_data: bool, cases: list[Any], project_dir: Path) -> set[str] | None:
    """Metric names this evaluation will produce (None: unknown until lm-eval runs)."""
    names: set[str] = set()
    if cfg.perplexity and has_data:
        names |= {"perplexity", "nll"}
    if cfg.generation is not None:  # else there are no cases
        for case in cases:
            names |= set(case.metrics(cfg.generation.metrics))
    if cfg.judge is not None:
        from kollm.eval.judge import load_rubric

        names |= {"judge_parse_failures", "judge_request_failures"}
        if "score" in cfg.judge.modes:
            criteria = load_rubric(cfg.judge.rubric, project_dir).criteria
            names |= {"judge_score", *(f"judge_score.{c.name}" for c in criteria)}
        if "pairwise" in cfg.judge.modes:
            names.add("judge_win_rate")
    return None if cfg.lm_eval else names


def _check_rules(step_name: str, rules: list[Any], produced: set[str] | None) -> None:
    if produced is None:
        return
    problems = [
        f"steps.{step_name}.config.gate[{i}]: '{r.text}' uses metric '{r.metric}', "
        "which this evaluation does not produce "
        f"(it produces: {', '.join(sorted(produced)) or 'nothing'})"
        for i, r in enumerate(rules)
        if r.metric not in produced
    ]
    if problems:
        raise ConfigError(problems)


def _device(choice: str) -> str:
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was requested but no CUDA device is available; use device: auto")
    return choice


def evaluate_model(
    ctx: StepContext,
    folder: Path,
    *,
    label: str,
    model_digest: str,
    eval_digest: str,
    data: tuple[str, list[Any]] | None,
    cases: list[Any],
    device: str,
):
    """Every configured measurement of one model folder. Returns a ModelEval."""
    import torch
    from transformers import AutoTokenizer

    from kollm.adapter import load_causal_lm
    from kollm.eval import perplexity as ppl
    from kollm.eval.generation import run_suite
    from kollm.eval.harness import run_lm_eval
    from kollm.eval.report import ModelEval

    cfg: Config = ctx.config
    tokenizer = AutoTokenizer.from_pretrained(folder)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    # transformers wraps PreTrainedModel.to in functools.wraps(nn.Module.to), which mypy sees as an unbound function
    # an adapter folder (a LoRA step's output) is merged into its base in memory (kollm.adapter)
    model = load_causal_lm(folder, dtype=dtype, project_dir=ctx.project_dir).to(device).eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    metrics: dict[str, float] = {}
    counts: dict[str, int] = {}
    suite_cases = []
    if data is not None:
        column, rows = data
        if column == "text":
            seqs = ppl.encode_corpus(tokenizer, rows, cfg.max_length)
        else:
            seqs = ppl.encode_chats(tokenizer, rows, cfg.perplexity_targets, cfg.max_length)
        if seqs:
            res = ppl.perplexity(model, seqs, batch_size=cfg.batch_size, pad_id=pad_id, progress=ctx.progress)
            metrics.update(perplexity=res.perplexity, nll=res.nll)
            counts.update(perplexity=res.sequences, nll=res.sequences)
            metrics["eval_tokens"] = float(res.tokens)
        else:
            ctx.log.warning("evaluate: no held-out row has tokens to score; perplexity skipped")
    if cases:
        gen = cfg.generation
        assert gen is not None  # cases come only from a configured generation suite
        suite = run_suite(
            model,
            tokenizer,
            cases,
            default_metrics=gen.metrics,
            chat=gen.chat,
            max_new_tokens=gen.max_new_tokens,
            batch_size=gen.batch_size,
            max_length=getattr(model.config, "max_position_embeddings", None),
            progress=ctx.progress,
        )
        metrics.update(suite.metrics)
        counts.update(suite.counts)
        suite_cases = suite.cases
    del model
    if cfg.lm_eval is not None:
        metrics.update(run_lm_eval(folder, cfg.lm_eval, ctx.project_dir, device))
    return ModelEval(label, model_digest, eval_digest, metrics, counts, suite_cases)


def _cached(ctx: StepContext, model_digest: str, eval_digest: str, compute):
    """Results of a model on this eval set from .kollm/eval-cache/, computing and storing them when missing."""
    from kollm.eval.report import ModelEval
    from kollm.pipeline.artifacts import write_json_atomic

    name = f"{model_digest.removeprefix('sha256:')[:24]}-{eval_digest[:24]}.json"
    path = ctx.state_dir / "eval-cache" / name
    if path.is_file():
        try:
            return ModelEval.from_json(json.loads(path.read_text(encoding="utf-8"))), True
        except (json.JSONDecodeError, TypeError, KeyError):
            pass  # a cache file from another version: recompute
    result = compute()
    write_json_atomic(path, result.to_json())
    return result, False


def run(ctx: StepContext) -> StepResult:
    from kollm import registry
    from kollm.config import load_config
    from kollm.eval.gate import decide, parse_rule
    from kollm.eval.report import render, training_curves
    from kollm.pipeline.artifacts import json_digest, write_json_atomic
    from kollm.pipeline.plan import code_digest

    cfg: Config = ctx.config
    rules = [parse_rule(r) for r in cfg.gate]
    model_in = ctx.inputs["model"]
    data_in = ctx.inputs.get("data") if cfg.perplexity else None
    cases = _load_cases(_suite_files(ctx.inputs["suite"]), cfg.generation.limit) if cfg.generation else []
    _check_rules(ctx.name, rules, _expected_metrics(cfg, data_in is not None, cases, ctx.project_dir))
    data = _eval_rows(data_in, cfg.max_eval_rows) if data_in is not None else None
    if not data and not cases and cfg.lm_eval is None:
        raise ConfigError(
            f"steps.{ctx.name}: nothing to evaluate: no held-out data is wired and no generation suite or lm_eval is configured",
            hint="put a prepare step before it, or add `generation:` with `inputs: {suite: <data source>}`",
        )
    device = _device(cfg.device)
    eval_digest = json_digest(
        {
            "data": data_in.digest if data_in else None,
            "suite": ctx.inputs["suite"].digest if cfg.generation else None,
            "settings": cfg.model_dump(
                mode="json",
                exclude={"gate", "require_champion", "compare_to", "registered_model", "device", "judge"},
            ),
            "code": code_digest(EVAL_CODE),
        }
    )

    def measure(folder: Path, label: str, digest: str):
        return lambda: evaluate_model(
            ctx,
            folder,
            label=label,
            model_digest=digest,
            eval_digest=eval_digest,
            data=data,
            cases=cases,
            device=device,
        )

    candidate, _ = _cached(ctx, model_in.digest, eval_digest, measure(model_in.folder(), "candidate", model_in.digest))
    candidate = replace(candidate, label="candidate")

    # the same evaluation of the registered aliases (champion, and any alias a rule names)
    project_name = load_config(ctx.project_dir)[0].project
    model_name = cfg.registered_model or project_name
    aliases = cfg.aliases(rules)
    references: dict[str, Any] = {}
    for alias in aliases:
        try:
            version = registry.show(model_name, alias, ctx.project_dir)
        except NotFound:
            references[alias] = None
            continue
        digest = (
            version.tags.get(SCORE_DIGEST_TAG)
            or f"mlflow-{model_name}-v{version.version}-{json_digest(version.source)[:12]}"
        )
        label = f"{alias} (v{version.version})"
        if digest == model_in.digest:
            ref = replace(candidate, label=label)
        else:
            folder = registry.resolve_model_uri(f"models:/{model_name}/{version.version}", ctx.project_dir)
            ref, _ = _cached(ctx, digest, eval_digest, measure(folder, label, digest))
        references[alias] = replace(ref, label=label, version=version.version)

    judged = None
    unavailable: dict[str, str] = {}
    if cfg.judge is not None:
        judged = _run_judge(ctx, cfg.judge, cases, candidate, references.get(cfg.judge.compare_to))
        candidate = replace(
            candidate,
            metrics={**candidate.metrics, **judged.metrics()},
            counts={**candidate.counts, **judged.counts()},
        )
        compared = references.get(cfg.judge.compare_to)
        if compared is not None:
            references[cfg.judge.compare_to] = replace(
                compared, metrics={**compared.metrics, **judged.reference_metrics()}
            )
        elif "pairwise" in cfg.judge.modes:
            unavailable["judge_win_rate"] = f"no '{cfg.judge.compare_to}' model registered yet to compare answers with"

    ref_metrics = {a: (r.metrics if r else None) for a, r in references.items()}
    decision = (
        decide(rules, candidate.metrics, ref_metrics, require_reference=cfg.require_champion, unavailable=unavailable)
        if rules
        else None
    )

    # outputs: metrics.json and report.html
    metrics_doc = {
        "model": {
            "digest": model_in.digest
        },  # no path, run id or time: the same evaluation gives the same bytes anywhere
        "eval_digest": eval_digest,
        "metrics": candidate.metrics,
        "counts": candidate.counts,
        "references": {
            a: ({"version": r.version, "digest": r.model_digest, "metrics": r.metrics} if r else None)
            for a, r in references.items()
        },
        "gate": decision.to_json() if decision else None,
        "registered_model": model_name,
    }
    metrics_dir = ctx.output_path("metrics")
    write_json_atomic(metrics_dir / "metrics.json", metrics_doc)
    curves = training_curves(ctx.upstream, registry.client(ctx.project_dir), ctx.state_dir / "logs" / "training")
    report_dir = ctx.output_path("report")
    html = render(
        title=f"{project_name}: evaluation ({ctx.name})",
        subtitle=f"candidate {model_in.digest[:19]} · registered model '{model_name}'",
        candidate=candidate,
        references=references,
        gate=decision,
        curves=curves,
        judge=judged,
    )
    (report_dir / "report.html").write_text(html, encoding="utf-8")
    write_json_atomic(
        report_dir / "report.json",
        {
            **metrics_doc,
            "cases": [c.__dict__ for c in candidate.cases],
            "judge": judged.to_json() if judged else None,
        },
    )

    # tracking: metrics, the champion's metrics beside them, the decision and every reason
    logged = dict(candidate.metrics)
    for alias, r in references.items():
        if r is not None:
            logged.update({f"{alias}.{k}": v for k, v in r.metrics.items()})
    if decision is not None:
        logged["gate_passed"] = float(decision.passed)
        ctx.tracker.set_tags(
            {"kollm.gate": "passed" if decision.passed else "failed", "kollm.gate.reasons": "\n".join(decision.reasons)}
        )
    ctx.tracker.log_metrics(logged)
    ctx.tracker.log_artifact(metrics_dir / "metrics.json", "evaluation")
    ctx.tracker.log_artifact(report_dir / "report.html", "evaluation")
    if judged is not None:
        _log_judgements(ctx, judged)

    if decision is not None and not decision.passed:
        kept = ctx.state_dir / "reports" / f"{ctx.name}-gate-failed.html"
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(report_dir / "report.html", kept)
        raise GateFailed(
            decision.explain(f"quality gate of step '{ctx.name}'"),
            hint=f"nothing was registered; report: {kept} (also in MLflow run {ctx.tracker.run_id})",
        )
    meta = {
        "gate": None if decision is None else decision.passed,
        "eval_digest": eval_digest,
        "model_digest": model_in.digest,
    }
    return StepResult(metrics=logged, meta={"metrics": meta, "report": meta})


# --- the LLM judge ----------------------------------------------------------------------------------------


def _run_judge(ctx: StepContext, judge_cfg: JudgeConfig, cases: list[Any], candidate: Any, compared: Any):
    """Judge the candidate's suite answers (and, where `compared` exists, its answers to the same prompts)."""
    from contextlib import nullcontext

    from kollm.eval.judge import Item, judge, load_rubric, question_text

    cfg: Config = ctx.config
    rubric = load_rubric(judge_cfg.rubric, ctx.project_dir)
    answers = {c.id: c.output for c in candidate.cases}
    reference = {c.id: c.output for c in compared.cases} if compared is not None else {}
    chosen = cases[: judge_cfg.limit] if judge_cfg.limit else cases
    items = [Item(str(c.id), question_text(c.prompt), answers[str(c.id)], reference.get(str(c.id))) for c in chosen]
    if judge_cfg.model.startswith("models:/"):
        from kollm.serve.local import local_server

        device = _device(cfg.device)
        ctx.log.info("evaluate: serving the judge %s on 127.0.0.1 (%s)", judge_cfg.model, device)
        server: Any = local_server(judge_cfg.model, project_dir=ctx.project_dir, device=device, backend="transformers")
    else:
        assert judge_cfg.base_url is not None  # JudgeConfig requires one for a model that is not models:/
        server = nullcontext((judge_cfg.base_url, judge_cfg.model))
    with server as (base_url, model_name):
        result = judge(
            items,
            base_url=base_url,
            cfg=judge_cfg,
            rubric=rubric,
            model_name=model_name,
            compare_to=judge_cfg.compare_to,
            progress=ctx.progress,
        )
    if result.parse_failures or result.request_failures:
        first = next(f for c in result.cases for f in c.failures)
        ctx.log.warning(
            "evaluate: %d of %d judge answers were not valid verdicts and %d requests failed (first: %s)",
            result.parse_failures,
            result.calls,
            result.request_failures,
            first,
        )
    return result


def _orders(orders: list[dict[str, Any]]) -> dict[str, Any]:
    """Table columns of the two pairwise verdicts (the candidate's answer shown as A, then as B)."""
    by_order = {o["order"]: o for o in orders}
    out = {}
    for side in ("A", "B"):
        o = by_order.get(f"candidate={side}", {})
        out[f"winner_candidate_{side}"] = o.get("winner")
        out[f"reason_candidate_{side}"] = o.get("reason")
    return out


MAX_JUDGE_TRACES = 100  # traces (with assessments) per evaluation; the table has every case


def _log_judgements(ctx: StepContext, judged: Any) -> None:
    """Per-case verdicts into the step's MLflow run: a table, and one trace per case (its question and answer) with
    the verdicts as LLM-judge assessments, which the MLflow UI lists beside the run."""
    import mlflow
    import pandas as pd
    from mlflow.entities import AssessmentSource, Feedback

    from kollm import registry

    rows = [
        {
            "case": c.id,
            "question": c.question,
            "answer": c.answer,
            "reference_answer": c.reference_answer,
            **{f"score.{k}": v for k, v in (c.scores or {}).items()},
            "score_reason": c.score_reason,
            "outcome": c.outcome,
            **_orders(c.orders),
            "failures": " | ".join(c.failures),
        }
        for c in judged.cases
    ]
    client = registry.client(ctx.project_dir)
    client.log_table(ctx.tracker.run_id, pd.DataFrame(rows), "evaluation/judge.json")
    run = client.get_run(ctx.tracker.run_id)
    source = AssessmentSource(source_type="LLM_JUDGE", source_id=judged.model)
    traced = []
    for c in judged.cases[:MAX_JUDGE_TRACES]:
        span = client.start_trace(
            "kollm.judge",
            inputs={"question": c.question},
            experiment_id=run.info.experiment_id,
            run_id=ctx.tracker.run_id,
            tags={"kollm.step": ctx.name, "kollm.case": c.id},
        )
        client.end_trace(span.trace_id, outputs={"answer": c.answer, "reference_answer": c.reference_answer})
        traced.append((span.trace_id, c))
    mlflow.flush_trace_async_logging()
    for trace_id, c in traced:
        for name, value in (c.scores or {}).items():
            mlflow.log_assessment(trace_id, Feedback(name=name, value=value, rationale=c.score_reason, source=source))
        if c.outcome is not None:
            reasons = "\n".join(f"{o['order']}: {o['winner']} — {o['reason']}" for o in c.orders)
            mlflow.log_assessment(
                trace_id,
                Feedback(name=f"pairwise_vs_{judged.compare_to}", value=c.outcome, rationale=reasons, source=source),
            )
