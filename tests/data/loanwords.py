"""Planted transliteration variants: 25 short Korean paragraphs (32-98 characters), each with a loanword, and per
paragraph three near-duplicate copies: a spacing variant, a punctuation variant, and one with the loanword in
Latin letters (데비안 -> Debian). Used by tests/data/test_dedup.py and benchmarks/prepare_throughput.py."""

from __future__ import annotations

import re

GROUPS = [
    ("데비안", "Debian", "데비안 13 버전이 드디어 나왔습니다. 설치 과정이 훨씬 간단해졌어요."),
    ("우분투", "Ubuntu", "회사 서버를 모두 우분투로 옮겼더니 관리가 훨씬 편해졌다."),
    (
        "리눅스",
        "Linux",
        "리눅스 명령어를 처음 배울 때는 누구나 헤맵니다. 매일 조금씩 연습해 보세요. 한 달쯤 지나면 손에 익고, 석 달이면 스크립트도 직접 짤 수 있습니다.",
    ),
    ("파이썬", "Python", "요즘 초등학생도 파이썬으로 간단한 게임을 만든다고 합니다."),
    ("구글", "Google", "지도를 찾을 때 구글 대신 국내 서비스를 쓰는 사람이 많다. 길 안내가 더 정확하기 때문이다."),
    ("컴퓨터", "computer", "오래된 컴퓨터를 버리지 말고 기부하면 필요한 곳에서 잘 쓰입니다."),
    (
        "서버",
        "server",
        "밤새 서버가 멈춰서 아침 회의가 취소되었다. 원인은 아직 찾는 중이며, 담당자들은 로그를 한 줄씩 다시 읽고 있다. 복구는 오후쯤 끝날 것으로 보인다.",
    ),
    ("도커", "Docker", "개발 환경을 도커로 맞추니 신입 사원도 첫날부터 코드를 돌릴 수 있었어요."),
    ("깃허브", "GitHub", "졸업 작품을 깃허브에 올려 두었더니 채용 담당자가 먼저 연락을 해 왔다."),
    ("유튜브", "YouTube", "할머니께서 요즘 유튜브로 요리 영상을 보시며 새 반찬을 만드신다."),
    ("카카오", "Kakao", "카카오 택시를 부르려는데 배터리가 다 떨어져서 한참을 걸었습니다."),
    ("네이버", "Naver", "모르는 단어가 나오면 네이버 사전에서 뜻과 예문을 함께 찾아봅니다."),
    ("삼성", "Samsung", "삼성 반도체 공장 견학은 예약이 금방 마감된다. 일찍 신청하는 것이 좋다."),
    ("스타벅스", "Starbucks", "비 오는 날 스타벅스 창가에 앉아 책을 읽는 것이 작은 행복이에요."),
    ("커피", "coffee", "아침에 커피 한 잔을 마시지 않으면 하루가 시작되지 않는 느낌이다."),
    ("아이폰", "iPhone", "새 아이폰 카메라는 밤에도 사진이 선명하게 찍힌다고 해서 바꿨습니다."),
    ("넷플릭스", "Netflix", "주말 내내 넷플릭스 드라마를 몰아 보다가 월요일 아침에 늦잠을 잤다."),
    ("안드로이드", "Android", "안드로이드 앱을 처음 출시했는데 첫 주에 내려받기가 천 건을 넘었어요!"),
    ("마이크로소프트", "Microsoft", "마이크로소프트 교육 프로그램을 마친 학생들에게 수료증이 주어졌다."),
    ("인스타그램", "Instagram", "동네 빵집이 인스타그램에 올린 사진 한 장으로 줄 서는 가게가 되었습니다."),
    ("페이스북", "Facebook", "고등학교 동창을 페이스북에서 다시 만나 이십 년 만에 저녁을 먹었다."),
    ("엑셀", "Excel", "월말 정산을 엑셀 함수 몇 개로 자동화하니 퇴근이 빨라졌어요."),
    ("자바", "Java", "학교에서는 자바를 먼저 가르치고, 그다음에 웹 개발을 배운다."),
    (
        "오라클",
        "Oracle",
        "오라클 데이터베이스 정기 점검 때문에 오늘 밤 열 시부터 두 시간 동안 모든 서비스가 중단됩니다. 이용에 불편을 드려 죄송합니다. 점검이 끝나면 공지로 다시 알려 드리겠습니다.",
    ),
    ("테슬라", "Tesla", "테슬라 전기차를 타 본 친구는 조용한 승차감이 가장 마음에 든다고 했다."),
]


def variants(hangul: str, latin: str, text: str) -> list[str]:
    """Three near-duplicate copies of `text`: spacing, punctuation, and the loanword in Latin letters."""
    spacing = text.replace(" ", "", 2).replace("을 ", "을  ")  # two spaces removed, one doubled
    punct = re.sub(r"[.,!]", "", text).replace("다 ", "다, ", 1) + "!"
    latin_copy = text.replace(hangul, latin).replace(
        " ", "  ", 1
    )  # the loanword in Latin letters (and a spacing change)
    return [spacing, punct, latin_copy]


def corpus() -> tuple[list[str], list[int]]:
    """The 100 texts in order (each paragraph, then its copies) and, per text, its original's index (-1 for originals)."""
    texts: list[str] = []
    origin: list[int] = []
    for hangul, latin, text in GROUPS:
        first = len(texts)
        texts.append(text)
        origin.append(-1)
        for copy in variants(hangul, latin, text):
            texts.append(copy)
            origin.append(first)
    return texts, origin
