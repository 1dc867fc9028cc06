"""Tiny models and data for training tests (CPU, seconds)."""

from __future__ import annotations

import random

import pytest
import torch

from kollm.train.modeling import scratch_model, train_tokenizer

SYLLABLES = "가나다라마바사아자차카타파하서울부산한국어문장입니다오늘날씨좋네요학교공부책"


def korean_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(3, 12))]
        out.append(" ".join(words) + rng.choice([".", "!", "?"]))
    return out


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The test machine is shared: one intra-op thread is faster than two contending ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer(korean_texts(300), vocab_size=400)


@pytest.fixture()
def tiny_model(tokenizer):
    torch.manual_seed(0)
    return scratch_model("tiny", tokenizer, seed=0, attn_implementation="sdpa")


@pytest.fixture(scope="session")
def texts():
    """korean_texts(n, seed=0): synthetic Korean sentences."""
    return korean_texts
