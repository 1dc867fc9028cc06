"""Perplexity against hand computation on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from kollm.errors import StepFailed
from kollm.eval.perplexity import Encoded, encode_chat, encode_corpus, perplexity
from tests.tiny import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok, seed=1)


def hand_perplexity(model, sequences: list[Encoded]) -> float:
    """One sequence at a time, no padding, softmax written out with Python floats."""
    total, count = 0.0, 0
    for seq in sequences:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([seq.ids])).logits[0].tolist()
        for t in range(1, len(seq.ids)):
            if not seq.target[t]:
                continue
            row = logits[t - 1]
            top = max(row)
            log_z = top + math.log(sum(math.exp(x - top) for x in row))
            total += log_z - row[seq.ids[t]]
            count += 1
    return math.exp(total / count)


def test_uniform_model_has_perplexity_vocab_size(tok):
    model = tiny_model(tok)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0 -> p = 1/V for every token
    seqs = encode_corpus(tok, ["안녕하세요. 만나서 반갑습니다.", "서울"], max_length=64)
    result = perplexity(model, seqs, batch_size=2, pad_id=tok.pad_token_id)
    assert result.perplexity == pytest.approx(len(tok), rel=1e-6)
    assert result.nll == pytest.approx(math.log(len(tok)), rel=1e-6)
    assert result.tokens == sum(len(s.ids) - 1 for s in seqs)


def test_matches_hand_computation_with_padding(tok, model):
    texts = ["안녕하세요. 만나서 반갑습니다.", "서울", "오늘 날씨가 맑고 따뜻합니다. 한국어 언어 모델을 평가합니다."]
    seqs = encode_corpus(tok, texts, max_length=64)
    expected = hand_perplexity(model, seqs)
    for batch_size in (1, 2, 3):
        got = perplexity(model, seqs, batch_size=batch_size, pad_id=tok.pad_token_id).perplexity
        assert got == pytest.approx(expected, rel=1e-5)


def test_corpus_encoding_appends_eos_and_windows_long_documents(tok):
    text = "오늘 날씨가 맑고 따뜻합니다. " * 5
    ids = tok(text)["input_ids"] + [tok.eos_token_id]
    seqs = encode_corpus(tok, [text, "   "], max_length=8)
    assert [t for s in seqs for t in s.ids] == ids  # blank documents are skipped, windows cover everything
    assert all(len(s.ids) <= 8 and s.target[0] is False and all(s.target[1:]) for s in seqs)


def test_chat_scores_only_assistant_replies(tok, model):
    messages = [
        {"role": "user", "content": "수도는?"},
        {"role": "assistant", "content": "서울입니다."},
        {"role": "user", "content": "날씨는?"},
        {"role": "assistant", "content": "맑습니다."},
    ]
    enc = encode_chat(tok, messages, "assistant", max_length=256)
    scored = tok.decode([i for i, t in zip(enc.ids, enc.target) if t])
    assert scored == "서울입니다.<|im_end|>\n맑습니다.<|im_end|>\n"
    every = encode_chat(tok, messages, "all", max_length=256)
    assert every.ids == enc.ids and sum(every.target) == len(every.ids) - 1
    assistant_ppl = perplexity(model, [enc], pad_id=tok.pad_token_id)
    assert assistant_ppl.tokens == sum(enc.target)
    assert assistant_ppl.perplexity == pytest.approx(hand_perplexity(model, [enc]), rel=1e-5)
    assert encode_chat(tok, [{"role": "user", "content": "질문만"}], "assistant", max_length=256) is None


def test_template_that_rewrites_history_is_refused(tok):
    odd = tiny_tokenizer()
    odd.chat_template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(StepFailed, match="perplexity_targets: all"):
        encode_chat(odd, msgs, "assistant", max_length=64)


def test_empty_eval_set_is_a_clear_error(tok, model):
    with pytest.raises(StepFailed, match="nothing to score"):
        perplexity(model, [], pad_id=0)


def test_evaluation_scores_exactly_the_tokens_sft_trains_on(tok):
    """Evaluation promises to score what SFT trains on: for every conversation the eval targets (token t scored
    given the tokens before it) are the SFT labels that are not ignored, token for token."""
    from kollm.train.data import IGNORE_INDEX
    from kollm.train.data import encode_chat as sft_encode

    conversations = [
        [{"role": "user", "content": "수도는?"}, {"role": "assistant", "content": "서울입니다."}],
        [
            {"role": "system", "content": "한국어로 답하세요."},
            {"role": "user", "content": " 날씨는 어때요? "},
            {"role": "assistant", "content": " 맑고 따뜻합니다"},
            {"role": "user", "content": "내일은?"},
            {"role": "assistant", "content": "비가 옵니다.\n우산을 챙기세요."},
        ],
    ]
    for messages in conversations:
        enc = encode_chat(tok, messages, "assistant", max_length=256)
        ids, labels = sft_encode(tok, messages)
        assert enc is not None and enc.ids == ids
        trained = [label != IGNORE_INDEX for label in labels]
        assert enc.target[1:] == trained[1:] and any(trained)
