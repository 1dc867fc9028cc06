"""The judge client against a real HTTP server on 127.0.0.1 that misbehaves on request: malformed JSON, 429s,
5xx, timeouts, a position-biased judge. Checks the swap logic, retries with backoff, failure counting and
bounded concurrency (kollm serve as the judge: tests/steps/test_evaluate_judge.py)."""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kollm.errors import ConfigError
from kollm.eval.judge import (
    DEFAULT_RUBRIC,
    Criterion,
    Item,
    JudgeConfig,
    Rubric,
    judge,
    load_rubric,
    pair_outcome,
    pairwise_messages,
    score_messages,
)


class FakeJudge:
    """Behaviour is chosen by a marker in the judged question: [malformed], [429x2] (two 429s, then an answer),
    [503] (always), [slow] (answers after 2.5 s), [400], [cut] (finish_reason length), [11] (a score out of range),
    [always-A] (a position-biased judge). Otherwise: score 7 everywhere; pairwise: the answer containing GOOD."""

    def __init__(self):
        self.hits: Counter[str] = Counter()
        self.authorization: list[str | None] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                fake.authorization.append(self.headers.get("authorization"))
                fake.answer(self, body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def answer(self, h: BaseHTTPRequestHandler, body: dict) -> None:
        user = body["messages"][-1]["content"]
        assert h.path == "/v1/chat/completions" and body["response_format"]["type"] == "json_schema"
        marker = (re.search(r"\[(malformed|429x2|503|slow|400|cut|11|always-A|sleep)\]", user) or [None, "ok"])[1]
        with self.lock:
            self.hits[marker] += 1
            n = self.hits[marker]
        if marker == "503" or (marker == "429x2" and n <= 2) or marker == "400":
            code = {"503": 503, "429x2": 429, "400": 400}[marker]
            return self.send(h, code, {"error": {"message": "nope"}}, {"retry-after": "0"} if code == 429 else {})
        if marker == "slow":
            time.sleep(2.5)
        if marker == "sleep":  # concurrency: how many of these are in flight at once
            with self.lock:
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
            time.sleep(0.15)
            with self.lock:
                self.in_flight -= 1
        finish = "length" if marker == "cut" else "stop"
        if marker == "malformed":
            content = '{"reason": "좋습니다", "scores": {"helpfulness": 7'
        elif "[답변 A]" in user:
            a, b = re.search(r"\[답변 A\]\n(.*)\n\n\[답변 B\]\n(.*)\n\n\[평가 기준\]", user, re.S).groups()
            winner = "A" if marker == "always-A" else "A" if "GOOD" in a else "B" if "GOOD" in b else "tie"
            content = json.dumps({"reason": f"{winner}가 낫습니다", "winner": winner}, ensure_ascii=False)
        else:
            score = 11 if marker == "11" else 7
            content = json.dumps(
                {"reason": "무난합니다", "scores": {c.name: score for c in DEFAULT_RUBRIC.criteria}}, ensure_ascii=False
            )
        self.send(
            h,
            200,
            {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}]},
        )

    @staticmethod
    def send(h: BaseHTTPRequestHandler, code: int, doc: dict, headers: dict | None = None) -> None:
        data = json.dumps(doc).encode()
        h.send_response(code)
        h.send_header("content-type", "application/json")
        h.send_header("content-length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        try:
            h.wfile.write(data)
        except BrokenPipeError:  # [slow]: the client has given up
            pass


@pytest.fixture(scope="module")
def fake():
    server = FakeJudge()
    yield server
    server.server.shutdown()
    server.server.server_close()


def config(**kw) -> JudgeConfig:
    return JudgeConfig(**{"model": "fake", "base_url": "http://unused", "backoff": 0.01, "max_retries": 2, **kw})


def run(fake: FakeJudge, items, **kw):
    fake.hits.clear()
    cfg = config(**kw)
    return judge(items, base_url=fake.url, cfg=cfg, rubric=DEFAULT_RUBRIC, compare_to="champion")


def test_pair_outcome_counts_a_win_only_when_both_orders_agree():
    assert pair_outcome("A", "B") == "win"  # candidate first, then second: both times the candidate
    assert pair_outcome("B", "A") == "loss"
    assert pair_outcome("A", "A") == "tie"  # position bias: the first answer always wins
    assert pair_outcome("B", "B") == "tie"
    assert pair_outcome("A", "tie") == "tie" and pair_outcome("tie", "tie") == "tie"
    assert pair_outcome(None, "B") is None and pair_outcome("A", None) is None


def test_pairwise_asks_both_orders_and_cancels_position_bias(fake):
    items = [
        Item("win", "질문 1", "GOOD 답변", "나쁜 답변"),
        Item("loss", "질문 2", "나쁜 답변", "GOOD 답변"),
        Item("biased", "질문 3 [always-A]", "GOOD 답변", "나쁜 답변"),
        Item("same", "질문 4", "같은 답변", "같은 답변"),
    ]
    result = run(fake, items, modes=["pairwise"])
    by_id = {c.id: c for c in result.cases}
    assert {k: c.outcome for k, c in by_id.items()} == {"win": "win", "loss": "loss", "biased": "tie", "same": "tie"}
    assert [o["winner"] for o in by_id["win"].orders] == ["A", "B"]  # candidate=A, then candidate=B
    assert [o["winner"] for o in by_id["biased"].orders] == ["A", "A"]
    assert by_id["biased"].orders[0]["reason"] == "A가 낫습니다"
    assert result.calls == 6  # identical answers are a tie without a call
    m = result.metrics()
    assert m["judge_win_rate"] == pytest.approx((1 + 2 / 2) / 4)
    assert "judge_score" not in m and m["judge_parse_failures"] == 0
    assert result.counts()["judge_wins"] == 1 and result.counts()["judge_ties"] == 2


def test_scores_of_both_answers_and_aggregation(fake):
    result = run(fake, [Item("a", "질문", "답", "챔피언 답"), Item("b", "질문 2", "답 2")], modes=["score"])
    m = result.metrics()
    assert m["judge_score"] == 7 and m["judge_score.fluency"] == 7
    assert result.reference_metrics() == {"judge_score": 7, **{f"judge_score.{c}": 7 for c in result.criteria}}
    assert result.cases[0].score_reason == "무난합니다" and result.counts()["judge_score"] == 2
    assert result.calls == 3 and "judge_win_rate" not in m


def test_429_is_retried_with_backoff_then_answers(fake):
    result = run(fake, [Item("a", "질문 [429x2]", "답")], modes=["score"])
    assert fake.hits["429x2"] == 3
    assert result.cases[0].scores is not None and result.request_failures == 0


def test_failures_are_counted_never_guessed(fake):
    items = [
        Item("malformed", "[malformed]", "답"),
        Item("cut", "[cut]", "답"),
        Item("range", "[11]", "답"),
        Item("down", "[503]", "답"),
        Item("bad", "[400]", "답"),
        Item("slow", "[slow]", "답"),
        Item("fine", "좋은 질문", "답"),
    ]
    result = run(fake, items, modes=["score"], timeout=1.0)
    assert result.parse_failures == 3 and result.request_failures == 3
    assert fake.hits["malformed"] == 1  # an answer is not retried
    assert fake.hits["503"] == 3 and fake.hits["slow"] == 3  # 1 + max_retries attempts
    assert fake.hits["400"] == 1  # a client error is not retried
    failures = {c.id: c.failures for c in result.cases}
    assert "parse failure: not JSON" in failures["malformed"][0] and "cut off at max_tokens" in failures["cut"][0]
    assert "scores.helpfulness is 11" in failures["range"][0]
    assert "HTTP 503" in failures["down"][0] and "after 3 attempts" in failures["down"][0]
    assert "timed out after 1s" in failures["slow"][0] and "HTTP 400" in failures["bad"][0]
    m = result.metrics()
    assert m["judge_parse_failures"] == 3 and m["judge_request_failures"] == 3
    assert m["judge_score"] == 7 and result.counts()["judge_score"] == 1  # only the case that was judged


def test_concurrency_is_bounded(fake):
    fake.max_in_flight = 0
    result = run(fake, [Item(str(i), f"[sleep] {i}", "답") for i in range(6)], modes=["score"], concurrency=2)
    assert result.calls == 6 and fake.max_in_flight == 2


def test_the_api_key_comes_from_the_named_variable(fake, monkeypatch):
    monkeypatch.setenv("KOLLM_TEST_JUDGE_KEY", "s3cret")
    fake.authorization.clear()
    result = run(fake, [Item("a", "질문", "답")], modes=["score"], api_key_env="KOLLM_TEST_JUDGE_KEY")
    assert result.calls == 1 and fake.authorization == ["Bearer s3cret"]
    fake.authorization.clear()
    run(fake, [Item("a", "질문", "답")], modes=["score"])
    assert fake.authorization == [None]


def test_korean_prompts_carry_the_rubric_and_its_instructions():
    rubric = Rubric(criteria=[Criterion(name="politeness", description="공손함: 존댓말")], instructions="짧게")
    user = score_messages(rubric, "질문", "답변")[1]["content"]
    assert "[질문]\n질문" in user and "- politeness: 공손함: 존댓말" in user and user.endswith("짧게")
    pair = pairwise_messages(DEFAULT_RUBRIC, "질문", "첫째", "둘째")[1]["content"]
    assert "[답변 A]\n첫째" in pair and "[답변 B]\n둘째" in pair and "- fluency: 유창성" in pair


def test_config_and_rubric_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="needs base_url"):
        JudgeConfig(model="gpt")
    with pytest.raises(ValueError, match="registry URI, which kollm serves itself"):
        JudgeConfig(model="models:/judge@champion", base_url="http://x/v1")
    monkeypatch.delenv("KOLLM_TEST_JUDGE_KEY", raising=False)
    with pytest.raises(ConfigError, match="environment variable KOLLM_TEST_JUDGE_KEY is not set"):
        config(api_key_env="KOLLM_TEST_JUDGE_KEY").api_key()
    with pytest.raises(ConfigError, match="rubric.yaml does not exist"):
        load_rubric("rubric.yaml", tmp_path)
    (tmp_path / "rubric.yaml").write_text("criteria:\n  - {name: 'bad name', description: x}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"criteria\[0\]\.name"):
        load_rubric("rubric.yaml", tmp_path)
    (tmp_path / "rubric.yaml").write_text(
        "criteria:\n  - {name: politeness, description: '공손함: 존댓말을 바르게 쓰는가'}\ninstructions: 짧게 답하세요\n",
        encoding="utf-8",
    )
    rubric = load_rubric("rubric.yaml", tmp_path)
    assert [c.name for c in rubric.criteria] == ["politeness"] and rubric.instructions == "짧게 답하세요"
