"""MLflow pyfunc model over a Hugging Face causal-LM folder ("models from code").

`kollm.steps.register` logs this file as the model's code with the HF folder as the artifact `hf_model`,
so a registered version loads in plain MLflow, without kollm installed:

    model = mlflow.pyfunc.load_model("models:/korean-quickstart@champion")
    model.predict(["서울은"])                                     # list of prompts
    model.predict(pd.DataFrame({"prompt": ["서울은"]}), params={"max_new_tokens": 32})
    model.predict([{"messages": [{"role": "user", "content": "안녕?"}]}])  # chat, via the chat template

Generation is greedy, batched with left padding. This file must only import mlflow, torch and transformers.
"""

from __future__ import annotations

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
        if hasattr(model_input, "to_dict"):  # a pandas DataFrame
            column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
            rows = list(model_input[column])
        elif isinstance(model_input, dict):
            rows = list(model_input["prompt"]) if "prompt" in model_input else [model_input]
        elif isinstance(model_input, str):
            rows = [model_input]
        else:
            rows = list(model_input)
        prompts = []
        for row in rows:
            if isinstance(row, dict) and "messages" in row:
                prompts.append(self._chat_prompt(row["messages"]))
            elif isinstance(row, list):  # a list of chat messages
                prompts.append(self._chat_prompt(row))
            else:
                prompts.append(str(row))
        return prompts

    def _chat_prompt(self, messages: list[dict[str, Any]]) -> str:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert isinstance(text, str)  # tokenize=False: the rendered text
        return text

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would turn them into a schema
        import torch

        params = params or {}
        max_new_tokens = int(params.get("max_new_tokens", 64))
        batch_size = int(params.get("batch_size", 8))
        prompts = self._prompts(model_input)
        outputs: list[str] = []
        for start in range(0, len(prompts), batch_size):
            batch = self.tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
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


mlflow.models.set_model(HFCausalLM())
