"""Preference objectives on a toy preference set: the chosen reply wins more and more."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from kollm.train import prefs
from kollm.train.data import PreferenceDataset, collate_preferences, encode_preferences
from kollm.train.loop import LoopConfig, evaluate, train

CPU = torch.device("cpu")


@pytest.fixture()
def toy_prefs():
    questions = ["서울은 어디에 있나요?", "김치는 무엇인가요?", "한글은 누가 만들었나요?", "부산은 어떤 도시인가요?"]
    return [
        {"prompt": [{"role": "user", "content": q}], "chosen": f"좋은 답변입니다 {i}.", "rejected": f"나쁜 대답 {i}!!"}
        for i, q in enumerate(questions * 2)
    ]


def _setup(model, tokenizer, records, kl=False):
    pairs, dropped = encode_preferences(tokenizer, records, max_len=64)
    assert dropped == 0 and len(pairs) == len(records)
    ds = PreferenceDataset(pairs, kl=kl)
    return ds, partial(collate_preferences, pad_id=tokenizer.pad_token_id)


@pytest.mark.parametrize("method", ["dpo", "orpo", "kto"])
def test_reward_margin_grows(method, tiny_model, tokenizer, toy_prefs):
    ds, collate = _setup(tiny_model, tokenizer, toy_prefs, kl=method == "kto")
    if method in ("dpo", "kto"):
        prefs.add_reference_logps(tiny_model, ds, device=CPU, batch_size=4, pad_id=tokenizer.pad_token_id)
    objective = {"dpo": prefs.dpo(0.5), "orpo": prefs.orpo(0.5), "kto": prefs.kto(0.5)}[method]
    loss0, m0 = evaluate(tiny_model, ds, device=CPU, batch_size=4, objective=objective, collate=collate)
    if method in ("dpo", "kto"):
        assert m0["reward_margin"] == pytest.approx(0.0, abs=1e-4)  # the policy starts as the reference
    logs = []
    train(
        tiny_model,
        ds,
        LoopConfig(max_steps=15, lr=3e-3, batch_size=4, log_every=5),
        device=CPU,
        objective=objective,
        collate=collate,
        on_log=logs.append,
    )
    loss1, m1 = evaluate(tiny_model, ds, device=CPU, batch_size=4, objective=objective, collate=collate)
    assert loss1 < loss0
    assert m1["reward_margin"] > m0["reward_margin"] + 0.1
    assert m1["reward_accuracy"] == 1.0
    assert "reward_margin" in logs[-1].metrics


def test_dpo_loss_matches_the_formula(tiny_model, tokenizer, toy_prefs):
    """With a reference shifted by a known amount the DPO loss is -log sigmoid(beta * shift)."""
    ds, collate = _setup(tiny_model, tokenizer, toy_prefs[:4])
    prefs.add_reference_logps(tiny_model, ds, device=CPU, batch_size=4, pad_id=tokenizer.pad_token_id)
    ds.ref_chosen = ds.ref_chosen - 2.0  # the policy already prefers chosen by 2 nats more than the reference
    loss, metrics = evaluate(tiny_model, ds, device=CPU, batch_size=4, objective=prefs.dpo(0.5), collate=collate)
    assert loss == pytest.approx(float(-torch.nn.functional.logsigmoid(torch.tensor(1.0))), abs=1e-4)
    assert metrics["reward_margin"] == pytest.approx(1.0, abs=1e-4)
