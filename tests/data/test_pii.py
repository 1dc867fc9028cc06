"""PII masking: Korean formats, checksums, numbers inside sentences, actions, and a planted-value property."""

from __future__ import annotations

import random

import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from kollm.data.pii import PiiConfig, luhn_valid, mask_text, pii_batch, rrn_valid, scan_text


def make_rrn(rng: random.Random, foreigner: bool = False) -> str:
    """A syntactically valid 주민등록번호 (or 외국인등록번호) with a correct check digit."""
    yy, mm, dd = rng.randint(0, 99), rng.randint(1, 12), rng.randint(1, 28)
    g = rng.choice([5, 6] if foreigner else [1, 2]) if yy > 20 else rng.choice([7, 8] if foreigner else [3, 4])
    body = f"{yy:02d}{mm:02d}{dd:02d}{g}" + "".join(str(rng.randint(0, 9)) for _ in range(5))
    s = sum(int(d) * w for d, w in zip(body, (2, 3, 4, 5, 6, 7, 8, 9, 2, 3, 4, 5)))
    check = (11 - s % 11) % 10 if not foreigner else (13 - s % 11) % 10
    digits = body + str(check)
    return f"{digits[:6]}-{digits[6:]}"


def make_card(rng: random.Random) -> str:
    body = [rng.randint(0, 9) for _ in range(15)]
    body[0] = rng.choice([4, 5])
    total = 0
    for i, d in enumerate(reversed(body)):
        if i % 2 == 0:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    digits = "".join(map(str, body)) + str((10 - total % 10) % 10)
    return "-".join(digits[i : i + 4] for i in range(0, 16, 4))


def make_phone(rng: random.Random) -> str:
    return rng.choice(
        [
            f"010-{rng.randint(1000, 9999)}-{rng.randint(1000, 9999)}",
            f"010{rng.randint(1000, 9999)}{rng.randint(1000, 9999)}",
            f"02-{rng.randint(200, 999)}-{rng.randint(1000, 9999)}",
            f"031-{rng.randint(200, 9999)}-{rng.randint(1000, 9999)}",
            f"+82 10-{rng.randint(1000, 9999)}-{rng.randint(1000, 9999)}",
            f"010.{rng.randint(1000, 9999)}.{rng.randint(1000, 9999)}",
        ]
    )


def make_email(rng: random.Random) -> str:
    user = "".join(rng.choices("abcdefghijklmnopqrstuvwxyz0123456789._", k=rng.randint(3, 12))).strip("._") or "kim"
    return f"{user}@{rng.choice(['naver.com', 'gmail.com', 'korea.ac.kr', 'example.co.kr'])}"


def make_account(rng: random.Random) -> str:
    return rng.choice(
        [
            f"110-{rng.randint(100, 999)}-{rng.randint(100000, 999999)}",
            f"{rng.randint(100000, 999999)}-04-{rng.randint(100000, 999999)}",
            f"1002-{rng.randint(100, 999)}-{rng.randint(100000, 999999)}",
        ]
    )


def test_checksums():
    rng = random.Random(0)
    for _ in range(50):
        assert rrn_valid(make_rrn(rng).replace("-", ""))
        assert rrn_valid(make_rrn(rng, foreigner=True).replace("-", ""))
        assert luhn_valid(make_card(rng).replace("-", ""))
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")


def test_rrn_with_bad_checksum_or_impossible_date_is_left_alone():
    good = make_rrn(random.Random(1))
    bad = good[:-1] + str((int(good[-1]) + 1) % 10)
    assert mask_text(f"주민번호 {good}입니다") == "주민번호 <RRN>입니다"
    assert mask_text(f"주민번호 {bad}입니다") == f"주민번호 {bad}입니다"
    assert mask_text("번호 991340-1234567") == "번호 991340-1234567"  # month 13


def test_foreigner_registration_number():
    frn = make_rrn(random.Random(2), foreigner=True)
    assert mask_text(f"외국인등록번호: {frn}") == "외국인등록번호: <RRN>"


def test_phone_numbers_inside_sentences():
    assert mask_text("궁금하시면 010-1234-5678로 연락주세요.") == "궁금하시면 <PHONE>로 연락주세요."
    assert (
        mask_text("대표번호는02-123-4567이고 팩스는 (031)234-5678입니다")
        == "대표번호는<PHONE>이고 팩스는 <PHONE>입니다"
    )
    assert mask_text("전화: 01098765432번으로") == "전화: <PHONE>번으로"
    assert mask_text("해외에서는 +82 10-2222-3333") == "해외에서는 <PHONE>"


def test_numbers_that_are_not_pii_are_left_alone():
    for text in [
        "발의연월일 : 2010. 11. 12.",
        "제63조제2항제4호",
        "2024-05-01에 시행",
        "가격은 12,000원",
        "3·1운동",
        "버전 1.2.3",
        "1588-1234 고객센터",
    ]:
        assert mask_text(text) == text, text


def test_email_card_account():
    assert mask_text("메일은 hong.gildong@korea.ac.kr으로 보내세요") == "메일은 <EMAIL>으로 보내세요"
    assert mask_text("카드번호 4111-1111-1111-1111 결제") == "카드번호 <CARD> 결제"
    assert mask_text("카드번호 4111-1111-1111-1112 결제") == "카드번호 4111-1111-1111-1112 결제"  # not Luhn-valid
    assert mask_text("신한은행 110-123-456789로 입금") == "신한은행 <ACCOUNT>로 입금"
    assert mask_text("국민은행 계좌 12345678901234 입니다") == "국민은행 계좌 <ACCOUNT> 입니다"


def test_keep_action_does_not_turn_a_phone_into_an_account():
    scan = scan_text("전화 010-1234-5678, 계좌 110-123-456789", mask=frozenset({"account"}))
    assert scan.text == "전화 010-1234-5678, 계좌 <ACCOUNT>"
    assert scan.found == {"phone": 1, "account": 1}


def test_pii_batch_actions_mask_drop_keep():
    batch = pd.DataFrame(
        {
            "text": [
                "연락처 010-1111-2222 입니다",
                "주민번호 " + make_rrn(random.Random(3)) + " 유출",
                "메일 a@b.com 남김",
                "깨끗한 문장",
            ],
            "_reject": ["", "", "", ""],
        }
    )
    out, found = pii_batch(batch, "corpus", PiiConfig(rrn="drop", email="keep"))
    assert out["text"][0] == "연락처 <PHONE> 입니다"
    assert out["_reject"].tolist() == ["", "pii:rrn", "", ""]
    assert out["text"][2] == "메일 a@b.com 남김"
    assert found == {"phone": 1, "rrn": 1, "email": 1}
    assert batch["text"][0] == "연락처 010-1111-2222 입니다"  # pure


def test_pii_batch_masks_message_contents():
    batch = pd.DataFrame(
        {
            "messages": [
                [{"role": "user", "content": "내 번호 010-9999-8888"}, {"role": "assistant", "content": "확인했습니다"}]
            ],
            "_reject": [""],
        }
    )
    out, _ = pii_batch(batch, "instructions", PiiConfig())
    assert out["messages"][0][0]["content"] == "내 번호 <PHONE>"


_filler = st.text(alphabet=st.sampled_from(list("가나다라마바사아자차카타파하 국민은행의요를,.!?\n")), max_size=30)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_masking_removes_every_planted_value(data):
    rng = random.Random(data.draw(st.integers(0, 2**32)))
    makers = [make_rrn, lambda r: make_rrn(r, True), make_card, make_phone, make_email, make_account]
    planted = [data.draw(st.sampled_from(makers))(rng) for _ in range(data.draw(st.integers(1, 4)))]
    parts = []
    for value in planted:
        parts += [
            data.draw(_filler),
            data.draw(st.sampled_from([" ", "(", ": ", "\n", ""])),
            value,
            data.draw(st.sampled_from([" ", ")", "로 ", "이고 ", "\n"])),
        ]
    text = "".join(parts) + data.draw(_filler)
    masked = mask_text(text)
    for value in planted:
        assert value not in masked, (value, masked)


def test_ordinary_words_and_other_hyphenated_numbers_are_not_accounts():
    """우리/하나/국민/기업 are ordinary words, and hyphenated digit groups are law, patent and business numbers too."""
    for text in [
        "우리 회사의 연 매출은 1234567890원",
        "하나 더 말하자면 총 1234567890원입니다",
        "국민 1인당 부채는 12345678901원",
        "기업 가치가 1500000000000원으로 평가",
        "법률 제12345-678-901호",
        "사업자등록번호 120-81-47521",
        "특허 출원번호 10-2020-0012345",
    ]:
        assert mask_text(text) == text, text


def test_accounts_with_a_bank_name_or_account_word_or_a_bank_format():
    assert mask_text("우리은행 1002123456789로 입금") == "우리은행 <ACCOUNT>로 입금"
    assert mask_text("하나은행 계좌는 12345678901234") == "하나은행 계좌는 <ACCOUNT>"
    assert mask_text("IBK기업은행 123-456789-01-234") == "IBK기업은행 <ACCOUNT>"
    assert mask_text("카카오뱅크 3333-01-1234567") == "카카오뱅크 <ACCOUNT>"
    assert mask_text("신한 110-123-456789 (홍길동)") == "신한 <ACCOUNT> (홍길동)"
    assert mask_text("이체할 곳: 123-45-67890") == "이체할 곳: <ACCOUNT>"  # an unusual shape, but after 이체
    assert (
        mask_text("1002-123-456789로 보내 주세요") == "<ACCOUNT>로 보내 주세요"
    )  # 우리은행's shape, no context needed
