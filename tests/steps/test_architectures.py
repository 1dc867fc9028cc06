"""The released Korean bases' architectures through kollm's whole path: a local Hugging Face folder of each (a tiny
random model from its transformers config class and a tokenizer of its family with its chat template, built
offline by kollm.train.architectures) goes through prepare -> sft with LoRA -> sft of all weights -> evaluate ->
register -> serve (the native engine's static path, over HTTP, its greedy answer equal to transformers'
`generate`). `base_model: scratch` with `architecture:` builds one of them itself.

Kept cheap (the suite's budget): the smallest data and step counts that still train, one MLflow store for the
module's projects (creating one costs about 2 s), the server in-process (FastAPI's TestClient)."""

from __future__ import annotations

import asyncio
import json
import random
import textwrap
import typing
from pathlib import Path

import pytest

import kollm
from kollm.errors import ConfigError
from kollm.train import architectures
from kollm.train.config import TrainingConfig
from tests.tiny import CORPUS

QA = [
    ("서울은 어느 나라의 수도인가요?", "서울은 대한민국의 수도입니다."),
    ("김치는 무엇인가요?", "김치는 한국의 발효 음식입니다."),
    ("한글은 누가 만들었나요?", "한글은 세종대왕이 만들었습니다."),
    ("부산은 어디에 있나요?", "부산은 한국의 남쪽에 있습니다."),
]
# what each base folder gets beyond build_folder's defaults: initializer ranges whose greedy answers vary from token to
# token after training (tests/serve/test_architectures.py's; at 0.02 every answer repeats one token), and a sliding
# window shorter than the prompt (mistral has one only when its config says so; gemma3 and exaone4 alternate windowed
# and global layers)
FOLDER: dict[str, dict[str, typing.Any]] = {
    "llama": {"initializer_range": 0.5},
    "qwen2": {"initializer_range": 0.5},
    "qwen3": {"initializer_range": 0.5},
    "mistral": {"initializer_range": 0.5, "sliding_window": 16},
    "gemma3": {"initializer_range": 0.05, "sliding_window": 16},
    "exaone4": {"initializer_range": 0.1, "sliding_window": 16},
}
ANSWER_TOKENS = 8


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    """One MLflow store shared by the module's projects (each its own experiment and registered model)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


SYLLABLES = "가나다라마바사아자차카타파하서울부산한국어문장입니다오늘날씨좋네요학교공부책"


def _sentence(rng: random.Random) -> str:
    return " ".join("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(3, 8)))


def write_project(root: Path, arch: str, tracking_uri: str | None = None) -> Path:
    root.mkdir(parents=True)
    texts = CORPUS + [q + " " + a for q, a in QA] * 5
    architectures.build_folder(root / "base", arch, texts, vocab_size=400, **FOLDER.get(arch, {}))
    rng = random.Random(0)
    rows = [
        {
            "messages": [
                {"role": "system", "content": "한국어로 답하세요."},
                {"role": "user", "content": _sentence(rng) + "?"},
                {"role": "assistant", "content": _sentence(rng)},
            ]
        }
        for _ in range(20)
    ]
    (root / "chats.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    suite = [{"prompt": [{"role": "user", "content": q}], "expected": a, "metric": "chrf"} for q, a in QA[:2]]
    (root / "suite.jsonl").write_text("\n".join(json.dumps(c, ensure_ascii=False) for c in suite), encoding="utf-8")
    train = "seq_len: 128, batch_size: 4, max_steps: 2, lr: 1.0e-3, log_every: 1, checkpoint_every: 0"
    tracking = f"tracking: {{uri: {json.dumps(tracking_uri)}}}" if tracking_uri else ""
    (root / "kollm.yaml").write_text(
        textwrap.dedent(
            f"""\
            project: arch-{arch}
            {tracking}
            data:
              chats: {{path: chats.jsonl}}
              suite: {{path: suite.jsonl}}
            steps:
              - kind: prepare
                inputs: {{source: chats}}
                config: {{dataset: instructions, split: {{eval_fraction: 0.2}}, filters: {{min_chars: 5}}}}
              - kind: sft
                name: sft-lora
                config: {{base_model: base, {train}, lora: {{r: 4, alpha: 8}}}}
              - kind: sft
                name: sft-full
                inputs: {{model: sft-lora.model, data: prepare.dataset}}
                config: {{{train}}}
              - kind: evaluate
                inputs: {{model: sft-full.model, data: prepare.dataset, suite: suite}}
                config: {{generation: {{max_new_tokens: 6}}, gate: ["perplexity > 0"]}}
              - kind: register
            """
        ),
        encoding="utf-8",
    )
    return root


def chat_over_http(model_folder: Path) -> tuple[str, dict]:
    """One greedy chat request through kollm's OpenAI app on the native engine's static path, in this process:
    (serving_path, response)."""
    from fastapi.testclient import TestClient

    from kollm.serve.engine import load_engine
    from kollm.serve.router import create_app

    engine = load_engine(model_folder, backend="transformers", device="cpu", kv_cache="static")
    with TestClient(create_app(engine, model_name="m")) as client:
        r = client.post(
            "/v1/chat/completions",
            json={
                "model": "m",
                "messages": [{"role": "user", "content": QA[0][0]}],
                "max_tokens": ANSWER_TOKENS,
                "temperature": 0,
            },
        )
        assert r.status_code == 200, r.text
        health = client.get("/health").json()
    asyncio.run(engine.shutdown())
    return health["serving_path"], r.json()


def greedy_answer(model_folder: Path) -> tuple[str, int]:
    """transformers' own greedy `generate` for the same chat: (reply text, tokens generated)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_folder)
    model = AutoModelForCausalLM.from_pretrained(model_folder).eval()
    text = tok.apply_chat_template([{"role": "user", "content": QA[0][0]}], add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, do_sample=False, max_new_tokens=ANSWER_TOKENS)[0, ids.shape[1] :].tolist()
    return tok.decode(out, skip_special_tokens=True), len(out)


@pytest.mark.slow(reason="a whole pipeline run (prepare, two sft steps, evaluate, register) and a served model")
@pytest.mark.parametrize("arch", architectures.ARCHITECTURES)
def test_a_local_folder_of_each_architecture_goes_through_the_whole_path(arch, tmp_path, tracking_uri):
    from transformers import AutoConfig

    from kollm.adapter import is_adapter
    from kollm.serve import resolve

    root = write_project(tmp_path / arch, arch, tracking_uri)
    result = kollm.run(root)
    lora, full = result.steps["sft-lora"], result.steps["sft-full"]
    assert lora.outputs["model"].meta["trainable_params"] < lora.outputs["model"].meta["params"] / 5
    assert full.outputs["model"].meta["trainable_params"] == full.outputs["model"].meta["params"]
    assert is_adapter(lora.outputs["model"].path)  # the LoRA step's output is its adapter, on the base folder
    assert not is_adapter(full.outputs["model"].path)
    base_config = AutoConfig.from_pretrained(root / "base")
    full_config = AutoConfig.from_pretrained(full.outputs["model"].path)
    assert full_config.model_type == base_config.model_type
    assert getattr(full_config, "sliding_window", None) == getattr(base_config, "sliding_window", None)
    for step in (lora, full):  # each output keeps its family's chat template
        path = step.outputs["model"].path
        template = json.loads((path / "tokenizer_config.json").read_text()).get("chat_template") or (
            path / "chat_template.jinja"
        ).read_text(encoding="utf-8")
        assert template == architectures.family_tokens(arch).template
    assert result.steps["evaluate"].metrics["perplexity"] > 1
    version = result.steps["register"].outputs
    folder = resolve(f"models:/arch-{arch}@challenger", root)
    assert (folder / "config.json").is_file(), version
    path, answer = chat_over_http(folder)
    assert path.startswith(f"native engine (--backend transformers), static KV cache for {base_config.model_type}")
    reply = answer["choices"][0]["message"]
    assert answer["usage"]["completion_tokens"] >= 1 and reply["role"] == "assistant"
    assert len(set(reply["content"])) >= 3  # an answer that varies, so that its equality checks something
    assert (reply["content"], answer["usage"]["completion_tokens"]) == greedy_answer(folder)


@pytest.mark.slow(reason="a pipeline run: prepare and an sft step with LoRA on a scratch model")
def test_scratch_builds_the_architecture_asked_for(tmp_path, tracking_uri):
    """`base_model: scratch` with `architecture: qwen3`: a Qwen3 model and a tokenizer with ChatML and tools."""
    from transformers import AutoConfig, AutoTokenizer

    root = write_project(tmp_path / "p", "llama", tracking_uri)
    text = (root / "kollm.yaml").read_text(encoding="utf-8")
    text = text.replace("base_model: base,", "base_model: scratch, architecture: qwen3, vocab_size: 400,")
    text = text.replace("lora: {r: 4, alpha: 8}", "lora: {r: 4, alpha: 8, merge: true}")  # no stored base to refer to
    text = text.split("  - kind: sft\n    name: sft-full")[0]
    (root / "kollm.yaml").write_text(text, encoding="utf-8")
    result = kollm.run(root)
    assert set(result.steps) == {"prepare", "sft-lora"}
    path = result.steps["sft-lora"].outputs["model"].path
    assert AutoConfig.from_pretrained(path).model_type == "qwen3"
    tok = AutoTokenizer.from_pretrained(path)
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "안녕"}], add_generation_prompt=True, tokenize=False
    )
    assert rendered == "<|im_start|>user\n안녕<|im_end|>\n<|im_start|>assistant\n"
    assert "<tool_call>" in tok.chat_template
    meta = json.loads((path / "kollm.json").read_text())
    assert meta["base_model"]["architecture"] == "qwen3"
    gen = json.loads((path / "generation_config.json").read_text())
    assert tok.convert_tokens_to_ids("<|im_end|>") in gen["eos_token_id"]


@pytest.mark.parametrize("arch", architectures.ARCHITECTURES)
def test_each_family_marks_assistant_replies_and_stops_at_its_end_of_turn(arch):
    """What SFT trains on (kollm.eval.perplexity.assistant_tokens: the reply and the token ending its turn) and
    what stops generation (end_of_turn_ids: in every saved generation config), for each family's template."""
    from kollm.eval.perplexity import assistant_tokens
    from kollm.train.modeling import end_of_turn_ids

    tok = architectures.train_tokenizer(CORPUS, 300, arch)
    end = {"mistral": "</s>"}.get(arch, architectures.family_tokens(arch).eos)
    messages = [
        {"role": "system", "content": "한국어로 답하세요."},
        {"role": "user", "content": "서울은?"},
        {"role": "assistant", "content": "서울은 수도입니다."},
        {"role": "user", "content": "부산은?"},
        {"role": "assistant", "content": "부산은 항구입니다."},
    ]
    turn = {
        "llama": "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "qwen2": "<|im_start|>assistant\n",
        "qwen3": "<|im_start|>assistant\n",
        "mistral": "[/INST]",
        "gemma3": "<start_of_turn>model\n",
        "exaone4": "[|assistant|]\n",
    }[arch]
    rendered = tok.apply_chat_template(messages[:2], add_generation_prompt=True, tokenize=False)
    assert rendered.endswith(turn) and (arch != "mistral" or "[SYSTEM_PROMPT]" in rendered)
    ids, mask = assistant_tokens(tok, messages, hint="")
    marked = [i for i, m in zip(ids, mask) if m]
    text = tok.decode(marked)
    assert text.count(end) == 2 and "서울은 수도입니다." in text and "부산은 항구입니다." in text
    assert "서울은?" not in text and "한국어로" not in text
    assert tok.convert_tokens_to_ids(end) in end_of_turn_ids(tok)


def test_architecture_is_for_scratch_only_and_names_the_choices(tmp_path):
    root = write_project(tmp_path / "p", "llama")
    text = (root / "kollm.yaml").read_text(encoding="utf-8")
    (root / "kollm.yaml").write_text(text.replace("base_model: base,", "base_model: base, architecture: exaone4,"))
    with pytest.raises(ConfigError, match="architecture applies only to base_model: scratch"):
        kollm.load(root)
    with pytest.raises(ValueError, match="architecture applies only to base_model: scratch"):
        TrainingConfig(base_model="./exaone-folder", architecture="exaone4")
    with pytest.raises(ValueError, match="architecture"):
        TrainingConfig(base_model="scratch", architecture="gpt2")  # type: ignore[arg-type]
    field = TrainingConfig.model_fields["architecture"].annotation
    assert set(typing.get_args(typing.get_args(field)[0])) == set(architectures.ARCHITECTURES)
    with pytest.raises(ConfigError, match="not one of llama, qwen2, qwen3, mistral, gemma3, exaone4"):
        architectures.family_tokens("gpt2")
