"""MLflow pyfunc model over a Hugging Face causal-LM folder ("models from code").

`kollm.steps.register` logs this file as the model's code with the HF folder as the artifact `hf_model`,
so a registered version loads in plain MLflow, without kollm installed:

    model = mlflow.pyfunc.load_model("models:/korean-quickstart@champion")
    model.predict(["서울은"])                                     # list of prompts
    model.predict(pd.DataFrame({"prompt": ["서울은"]}), params={"max_new_tokens": 32})
    model.predict([{"messages": [{"role": "user", "content": "안녕?"}]}])  # chat, via the chat template
    model.predict([[{"role": "user", "content": "안녕?"}]])               # the same: a list of chat messages

The input is a list (or a DataFrame); `predict`'s type hints are the model's signature (inputs: a list of any
of these rows, outputs: one string per row), so MLflow hands the list over as it is instead of forcing it into
a table. `mlflow models serve` takes {"inputs": [...], "params": {...}}. Generation is greedy, batched with left
padding. A LoRA adapter version (its `hf_model` holds adapter_config.json and the adapter's weights) loads
through transformers' PEFT integration from the base folder that adapter_config.json names
(`base_model_name_or_path`), which must exist where it is loaded. This file must only import mlflow, torch and
transformers.
"""

from __future__ import annotations

import math
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel


class HFCausalLM(PythonModel):
    def load_context(self, context):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = context.artifacts["hf_model"]
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(path)
        self.model.eval()

    def _prompts(self, model_input: Any) -> list[str]:
        if hasattr(model_input, "to_dict"):  # a pandas DataFrame: one row per prompt
            columns = list(model_input.columns)
            rows = list(model_input.to_dict(orient="records")) if len(columns) > 1 else list(model_input[columns[0]])
        elif isinstance(model_input, dict):
            rows = list(model_input["prompt"]) if "prompt" in model_input else [model_input]
        elif isinstance(model_input, str):
            rows = [model_input]
        else:
            rows = list(model_input)
        return [self._prompt(row) for row in rows]

    def _prompt(self, row: Any) -> str:
        if isinstance(row, dict):
            if _given(row.get("messages")):
                return self._chat_prompt(list(row["messages"]))
            if _given(row.get("prompt")):
                return str(row["prompt"])
        elif isinstance(row, list):  # a list of chat messages
            return self._chat_prompt(row)
        return str(row)

    def _chat_prompt(self, messages: list[Any]) -> str:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert isinstance(text, str)  # tokenize=False: the rendered text
        return text

    # The type hints make the signature (and keep MLflow from turning a list of chat messages into table columns)
    def predict(self, context, model_input: list[Any], params: dict[str, Any] | None = None) -> list[str]:
        import torch

        params = params or {}
        max_new_tokens = int(params.get("max_new_tokens", 64))
        batch_size = int(params.get("batch_size", 8))
        prompts = self._prompts(model_input)
        outputs: list[str] = []
        for start in range(0, len(prompts), batch_size):
            batch = self.tokenizer(
                prompts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
            )
            with torch.no_grad():
                generated = self.model.generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
            new_tokens = generated[:, batch["input_ids"].shape[1] :]
            outputs.extend(self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
        return outputs


def _given(value: Any) -> bool:
    """A value present in a row (a DataFrame fills a missing column with None or NaN)."""
    return value is not None and not (isinstance(value, float) and math.isnan(value))


mlflow.models.set_model(HFCausalLM())
