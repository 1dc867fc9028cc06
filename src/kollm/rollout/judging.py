"""The canary judge: `judge_win_rate` for one analysis window.

While a rollout with a judge runs, the gateway keeps a uniform sample of the canary's chat requests in the window
(kollm.serve.window.PromptSample, at most `max_calls // 2` bodies). At the window's end each sampled request is
sent again to both arms' serving apps directly (the apps the gateway routes to by `x-kollm-arm`; these requests
bypass the gateway, so they do not count as traffic in the window's success rate or latency) with temperature 0 and
`answer_max_tokens`, and the canary's answer is judged against the stable arm's in both orders
(kollm.eval.judge: a win or loss only when both orders agree; identical answers are a tie without a call). So a
window costs at most `max_calls` judge calls, whatever the traffic. Judge failures (unparseable verdicts, requests
that fail after their retries) are counted, never guessed. The per-pair records kept in the rollout state (the
first 200 characters of question and answers, verdicts, reasons) have personal data masked (kollm.data.pii).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx

from kollm.eval.judge import DEFAULT_RUBRIC, Item, JudgeClient, judge_pairs, question_text
from kollm.rollout.analysis import JudgeWindow
from kollm.rollout.state import CanaryJudge
from kollm.serve.gateway import Arm


def sampled_messages(body: bytes) -> list[dict[str, Any]] | None:
    """The chat messages of one sampled request body (None: not a chat request kollm can replay)."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    messages = data.get("messages") if isinstance(data, dict) else None
    if not isinstance(messages, list) or not messages:
        return None
    if not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
        return None  # multimodal parts or tool calls: the judge reads text
    return [{"role": str(m.get("role", "user")), "content": m["content"]} for m in messages]


async def _answer(client: httpx.AsyncClient, body: dict[str, Any]) -> str | None:
    try:
        r = await client.post("/v1/chat/completions", json=body)
        if r.status_code != 200:
            return None
        text = r.json()["choices"][0]["message"]["content"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
        return None
    return text if isinstance(text, str) else None


async def judge_window(
    spec: CanaryJudge,
    bodies: list[bytes],
    seen: int,
    *,
    stable: Arm,
    canary: Arm,
    model_name: str,
    api_key: str | None = None,
) -> tuple[JudgeWindow, list[dict[str, Any]]]:
    """Answer each sampled request with both arms and judge the pairs; the window's counts and, per pair, the
    verdicts with their reasons (for the step record)."""
    prompts = [m for m in (sampled_messages(b) for b in bodies[: spec.pairs]) if m is not None]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def arm_client(arm: Arm) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=arm.app)
        return httpx.AsyncClient(transport=transport, base_url="http://arm", headers=headers, timeout=spec.timeout)

    async with arm_client(stable) as to_stable, arm_client(canary) as to_canary:

        async def both(messages: list[dict[str, Any]]) -> tuple[str | None, str | None]:
            body = {
                "model": canary.model_name or model_name,
                "messages": messages,
                "max_tokens": spec.answer_max_tokens,
                "temperature": 0,
            }
            s, c = await asyncio.gather(
                _answer(to_stable, {**body, "model": stable.model_name or model_name}), _answer(to_canary, body)
            )
            return s, c

        answers = await asyncio.gather(*(both(m) for m in prompts))
    items, unanswered = [], 0
    for i, (messages, (stable_answer, canary_answer)) in enumerate(zip(prompts, answers, strict=True)):
        if stable_answer is None or canary_answer is None:
            unanswered += 1
            continue
        items.append(Item(str(i), question_text(messages), canary_answer, stable_answer))
    client = JudgeClient(
        spec.base_url,
        spec.model,
        api_key=spec.api_key(),
        max_tokens=spec.max_tokens,
        timeout=spec.timeout,
        max_retries=spec.max_retries,
        backoff=spec.backoff,
    )
    async with client:
        cases = await judge_pairs(client, items, spec.rubric or DEFAULT_RUBRIC, spec.max_reason_chars)
    outcomes = [c.outcome for c in cases]
    result = JudgeWindow(
        wins=outcomes.count("win"),
        ties=outcomes.count("tie"),
        losses=outcomes.count("loss"),
        sampled=len(prompts),
        seen=seen,
        calls=client.calls,
        parse_failures=client.parse_failures,
        request_failures=client.request_failures,
        answer_failures=unanswered + (len(bodies[: spec.pairs]) - len(prompts)),
    )
    from kollm.data.pii import mask_text  # the records are saved in the state file: no phone numbers, RRNs, ...

    verdicts = [
        {
            "question": mask_text(c.question[:200]),
            "canary": mask_text(c.answer[:200]),
            "stable": mask_text((c.reference_answer or "")[:200]),
            "outcome": c.outcome,
            "reasons": [o.get("reason", "") for o in c.orders],
            "failures": c.failures,
        }
        for c in cases
    ]
    return result, verdicts
