"""SFT data: only assistant tokens carry loss, with kollm's template and with a foreign one."""

from __future__ import annotations

import pytest

from kollm.errors import StepFailed
from kollm.train.data import encode_chat, encode_chats, pack_examples
from kollm.train.kernels import IGNORE_INDEX

CONV = [
    {"role": "system", "content": "짧게 답하세요."},
    {"role": "user", "content": "서울은 어느 나라의 수도입니까?"},
    {"role": "assistant", "content": "대한민국입니다."},
    {"role": "user", "content": "부산은요?"},
    {"role": "assistant", "content": "부산은 수도가 아닙니다."},
]


def _loss_text(tokenizer, ids, labels):
    """The text of each maximal run of labelled tokens."""
    runs, cur = [], []
    for t, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            assert lab == t
            cur.append(t)
        elif cur:
            runs.append(tokenizer.decode(cur))
            cur = []
    if cur:
        runs.append(tokenizer.decode(cur))
    return runs


def test_only_assistant_replies_and_their_end_of_turn_carry_loss(tokenizer):
    ids, labels = encode_chat(tokenizer, CONV)
    assert _loss_text(tokenizer, ids, labels) == ["대한민국입니다.<|im_end|>\n", "부산은 수도가 아닙니다.<|im_end|>\n"]
    # and the whole sequence is the rendered template
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(CONV, tokenize=False)


def test_only_last_reply_for_preferences(tokenizer):
    ids, labels = encode_chat(tokenizer, CONV, only_last=True)
    assert _loss_text(tokenizer, ids, labels) == ["부산은 수도가 아닙니다.<|im_end|>\n"]


def test_other_chat_template(tokenizer):
    """A Llama-3-like template (no <|im_start|>) works the same way."""
    import copy

    t = copy.deepcopy(tokenizer)
    t.chat_template = (
        "{% for m in messages %}{{ '### ' + m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### assistant: ' }}{% endif %}"
    )
    ids, labels = encode_chat(t, CONV)
    # the space after "assistant:" merges with the reply's first letter into one token, which carries loss
    assert [x.strip() for x in _loss_text(t, ids, labels)] == ["대한민국입니다.", "부산은 수도가 아닙니다."]


def test_template_that_rewrites_history_is_refused(tokenizer):
    import copy

    t = copy.deepcopy(tokenizer)
    # renders every turn but the last in upper case: earlier turns change once later turns exist
    t.chat_template = "{% for m in messages %}{% if loop.last %}{{ m['content'] }}{% else %}{{ m['content'] | upper }}x{% endif %}{% endfor %}"
    with pytest.raises(StepFailed, match="chat_template"):
        encode_chat(
            t,
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
        )


def test_packed_conversations_keep_their_own_labels(tokenizer):
    convs = [CONV, CONV[:3], [{"role": "user", "content": "안녕"}, {"role": "assistant", "content": "안녕하세요!"}]] * 3
    examples, truncated, dropped = encode_chats(tokenizer, convs, seq_len=128)
    assert truncated == 0 and dropped == 0
    rows = pack_examples(examples, 128, tokenizer.pad_token_id)
    assert len(rows) < len(examples)
    packed_loss = sorted(
        s for r in range(len(rows)) for s in _loss_text(tokenizer, rows.input_ids[r].tolist(), rows.labels[r].tolist())
    )
    alone = sorted(s for ids, labels in examples for s in _loss_text(tokenizer, ids.tolist(), labels.tolist()))
    assert packed_loss == alone


def test_truncation_and_dropping(tokenizer):
    long_user = [{"role": "user", "content": "가나다라 " * 200}, {"role": "assistant", "content": "네."}]
    fits = len(encode_chat(tokenizer, CONV)[0])
    examples, truncated, dropped = encode_chats(tokenizer, [long_user, CONV], seq_len=fits)
    assert truncated == 1 and dropped == 1 and len(examples) == 1
