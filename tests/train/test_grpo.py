"""GRPO with a user reward function: the rewarded behaviour becomes more frequent."""

from __future__ import annotations

from functools import partial

import torch

from kollm.train import prefs
from kollm.train.loop import LoopConfig, train
from kollm.train.modeling import end_of_turn_ids

CPU = torch.device("cpu")


def count_da(prompts, completions, **columns):
    """Reward: how often the reply uses the syllable 다 (and every call sees the extra dataset columns)."""
    assert len(prompts) == len(completions) == len(columns["answer"])
    return [float(c.count("다")) for c in completions]


def test_grpo_raises_the_reward(tiny_model, tokenizer):
    records = [{"prompt": [{"role": "user", "content": q}], "answer": "네"} for q in ["안녕", "서울", "한국어", "학교"]]
    ds = prefs.PromptDataset(tokenizer, records, max_prompt_len=64)
    objective = prefs.grpo(
        tokenizer,
        ds,
        count_da,
        num_generations=4,
        max_new_tokens=12,
        temperature=1.0,
        stop_ids=end_of_turn_ids(tokenizer),
    )
    logs = []
    torch.manual_seed(0)
    train(
        tiny_model,
        ds,
        LoopConfig(max_steps=15, lr=1e-2, batch_size=4, log_every=1),
        device=CPU,
        objective=objective,
        collate=partial(prefs.collate_prompts, pad_id=tokenizer.pad_token_id),
        on_log=logs.append,
    )
    rewards = [e.metrics["reward"] for e in logs]
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 1.0, rewards
    assert all(0 < e.metrics["completion_length"] <= 12 for e in logs)
