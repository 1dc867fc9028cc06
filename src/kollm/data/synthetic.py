"""Generated Korean data: the quickstart's instruction, preference and eval-suite files, and random
corpora (with planted near-duplicates and PII) for tests and benchmarks. Everything is deterministic
for a given seed.

The Q&A pairs come from small fact tables (capitals, provinces, antonyms, words in English, arithmetic,
reading numbers aloud, the articles of the Korean constitution that konlpy ships), phrased through several
question and answer templates with correct particles (은/는, 이/가, 을/를), so a tiny model can learn the
mapping and an eval suite can check it.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator
from pathlib import Path

# --- Korean helpers ---------------------------------------------------------------------------------

_DIGIT_BATCHIM = {
    "0": True,
    "1": True,
    "2": False,
    "3": True,
    "4": False,
    "5": False,
    "6": True,
    "7": True,
    "8": True,
    "9": False,
}


def has_batchim(word: str) -> bool:
    """Whether the last sound of `word` has a final consonant (for choosing 은/는, 이/가, 을/를)."""
    word = word.rstrip(" '\")」』")
    if not word:
        return False
    ch = word[-1]
    if "가" <= ch <= "힣":
        return (ord(ch) - 0xAC00) % 28 != 0
    if ch.isdigit():
        return _DIGIT_BATCHIM[ch]
    return ch.lower() in "lmnr"  # English words: a rough guess ("apple" -> 를, "school" -> 을)


def josa(word: str, pair: str) -> str:
    """`word` with the right particle: josa("사과", "을/를") -> "사과를"."""
    with_b, without_b = pair.split("/")
    return word + (with_b if has_batchim(word) else without_b)


_SINO = ["", "일", "이", "삼", "사", "오", "육", "칠", "팔", "구"]


def read_number(n: int) -> str:
    """Sino-Korean reading of 0 <= n < 100,000,000: 1234 -> 천이백삼십사."""
    if n == 0:
        return "영"
    out = []
    for unit_value, unit in ((10_000, "만"), (1, "")):
        part = (n // unit_value) % 10_000
        if not part:
            continue
        words = []
        for value, name in ((1000, "천"), (100, "백"), (10, "십"), (1, "")):
            d = (part // value) % 10
            if d:
                words.append(("" if d == 1 and name else _SINO[d]) + name)
        text = "".join(words)
        out.append(("" if text == "일" and unit == "만" else text) + unit)
    return "".join(out)


# --- fact tables --------------------------------------------------------------------------------------

CAPITALS = {
    "대한민국": "서울",
    "일본": "도쿄",
    "중국": "베이징",
    "미국": "워싱턴 D.C.",
    "영국": "런던",
    "프랑스": "파리",
    "독일": "베를린",
    "이탈리아": "로마",
    "스페인": "마드리드",
    "캐나다": "오타와",
    "호주": "캔버라",
    "러시아": "모스크바",
    "인도": "뉴델리",
    "브라질": "브라질리아",
    "멕시코": "멕시코시티",
    "이집트": "카이로",
    "태국": "방콕",
    "베트남": "하노이",
    "필리핀": "마닐라",
    "인도네시아": "자카르타",
    "튀르키예": "앙카라",
    "그리스": "아테네",
    "포르투갈": "리스본",
    "네덜란드": "암스테르담",
    "스웨덴": "스톡홀름",
    "노르웨이": "오슬로",
    "핀란드": "헬싱키",
    "몽골": "울란바토르",
    "아르헨티나": "부에노스아이레스",
    "케냐": "나이로비",
}
PROVINCES = {
    "경기도": "수원시",
    "강원특별자치도": "춘천시",
    "충청북도": "청주시",
    "충청남도": "홍성군",
    "전북특별자치도": "전주시",
    "전라남도": "무안군",
    "경상북도": "안동시",
    "경상남도": "창원시",
    "제주특별자치도": "제주시",
}
ANTONYMS = {
    "크다": "작다",
    "높다": "낮다",
    "길다": "짧다",
    "덥다": "춥다",
    "빠르다": "느리다",
    "많다": "적다",
    "밝다": "어둡다",
    "무겁다": "가볍다",
    "넓다": "좁다",
    "쉽다": "어렵다",
    "깊다": "얕다",
    "두껍다": "얇다",
    "가깝다": "멀다",
    "강하다": "약하다",
    "새롭다": "낡다",
    "기쁘다": "슬프다",
    "부자": "가난뱅이",
    "시작": "끝",
    "입구": "출구",
    "여름": "겨울",
    "아침": "저녁",
    "위": "아래",
    "앞": "뒤",
    "안": "밖",
    "남자": "여자",
    "성공": "실패",
    "찬성": "반대",
    "증가": "감소",
}
ENGLISH = {
    "사과": "apple",
    "물": "water",
    "책": "book",
    "학교": "school",
    "고양이": "cat",
    "개": "dog",
    "집": "house",
    "하늘": "sky",
    "바다": "sea",
    "나무": "tree",
    "꽃": "flower",
    "친구": "friend",
    "음식": "food",
    "자동차": "car",
    "컴퓨터": "computer",
    "선생님": "teacher",
    "학생": "student",
    "시간": "time",
    "도시": "city",
    "노래": "song",
    "가족": "family",
    "비": "rain",
    "눈": "snow",
    "태양": "sun",
    "달": "moon",
    "별": "star",
    "의자": "chair",
    "창문": "window",
    "문": "door",
    "우유": "milk",
}
GENERAL = [
    ("일주일은 며칠인가요?", "일주일은 7일입니다. 월요일부터 일요일까지예요.", "7일"),
    ("1년은 몇 개월인가요?", "1년은 12개월입니다.", "12개월"),
    ("하루는 몇 시간인가요?", "하루는 24시간입니다.", "24시간"),
    ("한 시간은 몇 분인가요?", "한 시간은 60분입니다.", "60분"),
    ("물이 어는 온도는 몇 도인가요?", "물은 섭씨 0도에서 얼어요.", "0도"),
    ("물이 끓는 온도는 몇 도인가요?", "물은 1기압에서 섭씨 100도에 끓습니다.", "100도"),
    (
        "한글을 만든 왕은 누구인가요?",
        "한글은 조선의 세종대왕이 만들었습니다. 1443년에 창제하고 1446년에 훈민정음으로 반포했어요.",
        "세종대왕",
    ),
    ("대한민국의 국화는 무엇인가요?", "대한민국의 국화는 무궁화입니다.", "무궁화"),
    (
        "한국에서 가장 높은 산은 어디인가요?",
        "한국에서 가장 높은 산은 제주도의 한라산으로, 높이는 약 1,947미터입니다.",
        "한라산",
    ),
    (
        "한국에서 가장 긴 강은 무엇인가요?",
        "한국에서 가장 긴 강은 압록강이고, 남한에서는 낙동강이 가장 깁니다.",
        "낙동강",
    ),
    ("한국의 전통 명절 중 음력 8월 15일은 무엇인가요?", "음력 8월 15일은 추석입니다. 한가위라고도 불러요.", "추석"),
    ("설날에 먹는 대표적인 음식은 무엇인가요?", "설날에는 보통 떡국을 먹습니다.", "떡국"),
    (
        "무지개는 몇 가지 색인가요?",
        "무지개는 흔히 빨강, 주황, 노랑, 초록, 파랑, 남색, 보라의 일곱 가지 색으로 나타냅니다.",
        "일곱",
    ),
    ("지구에서 가장 큰 바다는 어디인가요?", "지구에서 가장 큰 바다는 태평양입니다.", "태평양"),
    ("태양계에서 가장 큰 행성은 무엇인가요?", "태양계에서 가장 큰 행성은 목성입니다.", "목성"),
    ("한국의 화폐 단위는 무엇인가요?", "한국의 화폐 단위는 원입니다.", "원"),
]
SYSTEM_PROMPTS = [
    "당신은 친절한 한국어 비서입니다.",
    "당신은 질문에 짧고 정확하게 답하는 도우미입니다.",
    "존댓말로 간결하게 답하세요.",
]


def constitution_articles(kolaw_file: Path) -> dict[int, str]:
    """Article number -> its first paragraph, from the main body of konlpy's constitution.txt."""
    articles: dict[int, str] = {}
    for line in kolaw_file.read_text(encoding="utf-8").splitlines():
        if line.strip() == "부칙":
            break
        m = re.match(r"\s*제(\d+)조\s*(?:①\s*)?(.+)", line)
        if m and int(m.group(1)) not in articles:
            articles[int(m.group(1))] = m.group(2).strip()
    return articles


# --- Q&A generators ---------------------------------------------------------------------------------


def _qa_capital(rng: random.Random) -> tuple[str, str, str]:
    country, capital = rng.choice(list(CAPITALS.items()))
    q = rng.choice(
        [
            f"{country}의 수도는 어디인가요?",
            f"{country}의 수도가 어디야?",
            f"{country} 수도를 알려 주세요.",
            f"{josa(country, '은/는')} 수도가 어디예요?",
        ]
    )
    a = rng.choice(
        [
            f"{country}의 수도는 {capital}입니다.",
            f"{capital}입니다. {josa(capital, '이/가')} {country}의 수도예요.",
            f"{country}의 수도는 {josa(capital, '이에요/예요')}.",
        ]
    )
    return q, a, capital


def _qa_province(rng: random.Random) -> tuple[str, str, str]:
    prov, city = rng.choice(list(PROVINCES.items()))
    q = rng.choice(
        [f"{prov}의 도청은 어디에 있나요?", f"{prov} 도청 소재지가 어디야?", f"{prov}의 도청 소재지를 알려 주세요."]
    )
    a = rng.choice([f"{prov}의 도청은 {city}에 있습니다.", f"{prov}의 도청 소재지는 {city}입니다."])
    return q, a, city


def _qa_antonym(rng: random.Random) -> tuple[str, str, str]:
    word, opp = rng.choice(list(ANTONYMS.items()))
    if rng.random() < 0.5:
        word, opp = opp, word
    q = rng.choice(
        [
            f"'{word}'의 반대말은 무엇인가요?",
            f"'{word}'의 반대말이 뭐야?",
            f"{josa(repr(word), '과/와')} 뜻이 반대인 말을 알려 주세요.",
        ]
    )
    a = rng.choice([f"'{word}'의 반대말은 '{opp}'입니다.", f"'{opp}'입니다."])
    return q, a, opp


def _qa_english(rng: random.Random) -> tuple[str, str, str]:
    # No particle right after an English word: its reading decides 은/는, and spelling cannot tell it.
    ko, en = rng.choice(list(ENGLISH.items()))
    qk, qe = f"'{ko}'", f"'{en}'"
    if rng.random() < 0.7:
        q = rng.choice(
            [
                f"{josa(qk, '을/를')} 영어로 하면 무엇인가요?",
                f"{josa(qk, '은/는')} 영어로 뭐라고 해?",
                f"{qk}의 영어 단어를 알려 주세요.",
            ]
        )
        a = rng.choice([f"{josa(qk, '은/는')} 영어로 {qe}입니다.", f"영어 단어로는 {qe}입니다."])
        return q, a, en
    q = rng.choice([f"영어 단어 {qe}의 뜻은 무엇인가요?", f"영어 {qe}의 한국어 뜻을 알려 주세요."])
    a = rng.choice([f"{qe}의 뜻은 {qk}입니다.", f"{josa(qk, '이라는/라는')} 뜻입니다."])
    return q, a, ko


def _qa_arith(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op = rng.choice(["더하기", "빼기", "곱하기"])
    if op == "빼기" and b > a:
        a, b = b, a
    c = a + b if op == "더하기" else a - b if op == "빼기" else a * b
    q = rng.choice(
        [
            f"{a} {op} {b}{'는' if not has_batchim(str(b)) else '은'} 얼마인가요?",
            f"{a} {op} {b}{'는' if not has_batchim(str(b)) else '은'}?",
            f"{josa(str(a), '과/와')} {b}의 {josa('합' if op == '더하기' else '차' if op == '빼기' else '곱', '을/를')} 구해 주세요.",
        ]
    )
    ans = rng.choice([f"{a} {op} {b}{'는' if not has_batchim(str(b)) else '은'} {c}입니다.", f"답은 {c}입니다."])
    return q, ans, str(c)


def _qa_number(rng: random.Random) -> tuple[str, str, str]:
    n = rng.choice([rng.randint(11, 99), rng.randint(100, 999), rng.randint(1000, 99999)])
    reading = read_number(n)
    q = rng.choice(
        [
            f"{n}{'을' if has_batchim(str(n)) else '를'} 한글로 읽으면 어떻게 되나요?",
            f"숫자 {n}{'을' if has_batchim(str(n)) else '를'} 한국어로 읽어 주세요.",
        ]
    )
    a = rng.choice([f"{n}{'은' if has_batchim(str(n)) else '는'} '{reading}'(이)라고 읽습니다.", f"'{reading}'입니다."])
    return q, a, reading


def _qa_general(rng: random.Random) -> tuple[str, str, str]:
    return rng.choice(GENERAL)


def _qa_constitution(rng: random.Random, articles: dict[int, str]) -> tuple[str, str, str]:
    n = rng.choice(sorted(articles))
    text = articles[n]
    q = rng.choice(
        [
            f"대한민국 헌법 제{n}조의 내용을 알려 주세요.",
            f"헌법 제{n}조는 무엇을 규정하나요?",
            f"대한민국 헌법 제{n}조 제1항은 무엇인가요?",
        ]
    )
    a = rng.choice([f'대한민국 헌법 제{n}조는 다음과 같습니다. "{text}"', f"헌법 제{n}조에 따르면 {text}"])
    return q, a, text


_GENERATORS = [
    (_qa_capital, 3),
    (_qa_province, 1),
    (_qa_antonym, 2),
    (_qa_english, 2),
    (_qa_arith, 3),
    (_qa_number, 1),
    (_qa_general, 2),
]


def _pick(rng: random.Random, articles: dict[int, str]) -> tuple[str, str, str, str]:
    gens: list[Callable[[random.Random], tuple[str, str, str]] | str] = [g for g, w in _GENERATORS for _ in range(w)]
    if articles:
        gens += ["constitution"] * 2
    g = rng.choice(gens)
    if isinstance(g, str):  # "constitution": its generator also needs the articles
        return ("constitution", *_qa_constitution(rng, articles))
    return (g.__name__.removeprefix("_qa_"), *g(rng))


def generate_instructions(n: int = 400, seed: int = 0, articles: dict[int, str] | None = None) -> list[dict]:
    """Chat-format SFT rows (a few in instruction/input/output form, a few with PII or broken on purpose,
    so the prepare report has something to show)."""
    rng = random.Random(seed)
    rows: list[dict] = []
    for i in range(n):
        _, q, a, _ = _pick(rng, articles or {})
        if i % 10 == 3:
            rows.append({"instruction": q, "input": "", "output": a})
            continue
        msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        if rng.random() < 0.2:
            msgs.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        rows.append({"messages": msgs})
    # rows with personal data: the prepare step masks it (<PHONE>, <EMAIL>)
    for i in range(8):
        phone = f"010-{rng.randint(2000, 9999)}-{rng.randint(1000, 9999)}"
        rows.append(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": f"제 연락처는 {phone}이고 메일은 user{i}@example.com입니다. 배송 문의를 남기고 싶어요.",
                    },
                    {
                        "role": "assistant",
                        "content": "문의가 접수되었습니다. 담당자가 남겨 주신 연락처로 곧 연락드리겠습니다.",
                    },
                ]
            }
        )
    rows.append({"messages": [{"role": "user", "content": "답이 없는 질문입니다."}]})  # no assistant reply: rejected
    rows.append({"instruction": "출력이 빠진 예시입니다."})  # no output: rejected
    rows.extend(rows[:3])  # exact duplicates: removed
    return rows


_BAD_REPLIES = [
    "잘 모르겠습니다.",
    "그건 제가 답할 수 없는 질문이에요.",
    "음... 글쎄요.",
    "I don't know.",
    "질문을 다시 해 주세요.",
]


def generate_preferences(n: int = 300, seed: int = 1, articles: dict[int, str] | None = None) -> list[dict]:
    """Preference rows: the correct answer is chosen; a wrong fact, an evasive or an English reply is rejected."""
    rng = random.Random(seed)
    rows = []
    wrong_pool: dict[str, list[str]] = {}
    for _ in range(n * 2):
        kind, q, a, key = _pick(rng, articles or {})
        wrong_pool.setdefault(kind, []).append(key)
    rng = random.Random(seed)
    for i in range(n):
        kind, q, a, key = _pick(rng, articles or {})
        style = rng.random()
        others = [w for w in wrong_pool.get(kind, []) if w != key]
        if style < 0.6 and others and kind != "constitution":
            rejected = a.replace(key, rng.choice(others)) if key in a else rng.choice(_BAD_REPLIES)
        elif style < 0.85:
            rejected = rng.choice(_BAD_REPLIES)
        else:
            rejected = f"{a} {a}"  # a repetitive, padded answer
        if rejected.strip() == a.strip():
            rejected = rng.choice(_BAD_REPLIES)
        prompt: str | list[dict] = q if i % 3 else [{"role": "user", "content": q}]
        rows.append({"prompt": prompt, "chosen": a, "rejected": rejected})
    return rows


# an answer in Korean words: two Hangul syllables in a row and no replacement character (U+FFFD: bytes that are no
# UTF-8 text) except one or two at the very end (a character cut in half by max_new_tokens)
KOREAN_ANSWER = r"^[^\ufffd]*[가-힣]{2}[^\ufffd]*\ufffd{0,2}$"
KOREAN_PROMPTS = (
    "자기소개를 한 문장으로 해 주세요.",
    "오늘 날씨에 대해 한마디 해 주세요.",
    "좋아하는 음식을 말해 주세요.",
    "한국의 계절을 설명해 주세요.",
    "도서관에서 무엇을 하나요?",
    "주말에 무엇을 하고 싶나요?",
)


def generate_eval_suite(seed: int = 2, articles: dict[int, str] | None = None) -> list[dict]:
    """Generation eval cases `{prompt, expected, metric}`. metric: `contains` (the expected text occurs in the
    answer), `regex` (the answer is Korean words: KOREAN_ANSWER) or `chrf` (character n-gram F-score against the
    expected text, 0-100, for long answers)."""
    rng = random.Random(seed)
    cases = []
    for country, capital in list(CAPITALS.items())[:12]:
        cases.append(
            {"prompt": f"{country}의 수도는 어디인가요?", "expected": capital.split()[0], "metric": "contains"}
        )
    for word, opp in list(ANTONYMS.items())[:8]:
        cases.append({"prompt": f"'{word}'의 반대말은 무엇인가요?", "expected": opp, "metric": "contains"})
    for ko, en in list(ENGLISH.items())[:8]:
        cases.append({"prompt": f"'{ko}'의 영어 단어를 알려 주세요.", "expected": en, "metric": "contains"})
    for _ in range(8):
        a, b = rng.randint(2, 49), rng.randint(2, 49)
        cases.append(
            {
                "prompt": f"{a} 더하기 {b}{'는' if not has_batchim(str(b)) else '은'} 얼마인가요?",
                "expected": str(a + b),
                "metric": "contains",
            }
        )
    for q, _, key in GENERAL[:6]:
        cases.append({"prompt": q, "expected": key, "metric": "contains"})
    for prompt in KOREAN_PROMPTS:  # is the answer Korean text at all (a broken model's is not)?
        cases.append({"prompt": prompt, "expected": KOREAN_ANSWER, "metric": "regex"})
    for n in sorted(articles or {})[:6]:
        cases.append(
            {
                "prompt": f"대한민국 헌법 제{n}조의 내용을 알려 주세요.",
                "expected": (articles or {})[n],
                "metric": "chrf",
            }
        )
    return cases


# --- random corpora (tests, benchmarks) --------------------------------------------------------------

_SYLLABLES = [chr(c) for c in range(0xAC00, 0xD7A4, 7)]
_ENDINGS = ["다.", "습니다.", "어요.", "네요.", "까요?", "다!", "죠.", "요."]
_PARTICLES = ["은", "는", "이", "가", "을", "를", "에", "에서", "으로", "와", "과", "의", "도", "만", ""]


def random_words(rng: random.Random, n: int = 5000) -> list[str]:
    return ["".join(rng.choices(_SYLLABLES, k=rng.choice((1, 2, 2, 2, 3, 3, 4)))) for _ in range(n)]


def random_document(rng: random.Random, words: list[str], sentences: int) -> str:
    out = []
    for _ in range(sentences):
        k = rng.randint(4, 14)
        ws = rng.choices(words, k=k)
        parts = [w + rng.choice(_PARTICLES) for w in ws[:-1]] + [ws[-1] + rng.choice(_ENDINGS)]
        if rng.random() < 0.2:
            parts.insert(
                rng.randint(0, len(parts)), rng.choice(["(주)", "2024년", "15%", "「보고서」", "·", "ABC", "3.5"])
            )
        out.append(" ".join(parts))
    return " ".join(out)


def perturb(rng: random.Random, text: str, edits: int = 2) -> str:
    """A near-duplicate: spacing, punctuation and a few word-level edits changed."""
    words = text.split(" ")
    for _ in range(edits):
        i = rng.randrange(len(words))
        op = rng.random()
        if op < 0.4:
            words[i] = words[i] + rng.choice([",", "!", "…", ""])
        elif op < 0.7 and len(words) > 1:
            words[i] = ""
        else:
            words[i] = "".join(rng.choices(_SYLLABLES, k=2))
    out = " ".join(w for w in words if w)
    out = out.replace(" ", "  ", 1) if rng.random() < 0.5 else out.replace(". ", ".\n", 1)
    return out


def corpus_with_near_duplicates(
    n_docs: int, dup_fraction: float = 0.1, sentences: tuple[int, int] = (5, 20), seed: int = 0
) -> tuple[list[str], list[int]]:
    """`n_docs` random Korean documents, `dup_fraction` of them near-duplicates of an earlier one.
    Returns the texts and, per text, the index of the original it copies (-1 for originals)."""
    rng = random.Random(seed)
    words = random_words(rng)
    texts: list[str] = []
    origin: list[int] = []
    for _ in range(n_docs):
        if texts and rng.random() < dup_fraction:
            j = rng.randrange(len(texts))
            j = origin[j] if origin[j] >= 0 else j
            texts.append(perturb(rng, texts[j], edits=rng.randint(0, 2)))
            origin.append(j)
        else:
            texts.append(random_document(rng, words, rng.randint(*sentences)))
            origin.append(-1)
    return texts, origin


def iter_corpus_mb(target_mb: float, seed: int = 0, dup_fraction: float = 0.02) -> Iterator[str]:
    """Random documents until about `target_mb` MB of UTF-8 text (for throughput benchmarks)."""
    rng = random.Random(seed)
    words = random_words(rng)
    total = 0
    recent: list[str] = []
    while total < target_mb * 1e6:
        if recent and rng.random() < dup_fraction:
            doc = perturb(rng, rng.choice(recent))
        else:
            doc = random_document(rng, words, rng.randint(5, 30))
            recent = (recent + [doc])[-1000:]
        total += len(doc.encode("utf-8"))
        yield doc
