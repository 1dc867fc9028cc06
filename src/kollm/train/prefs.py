"""Preference objectives for `align`: DPO, ORPO and KTO, as loss functions of the shared training loop.

Formulas follow the papers and TRL's implementations (DPO "sigmoid" loss with optional label smoothing;
ORPO: NLL on the chosen reply plus the log-odds-ratio term on length-normalised log-probs; KTO with the
batch KL estimate from mismatched prompt/reply pairs). DPO and KTO compare against a frozen reference: its
log-probs are computed once, before training, from the initial model (`add_reference_logps`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from kollm.train.data import PreferenceDataset, collate_preferences
from kollm.train.kernels import IGNORE_INDEX, causal_lm
from kollm.train.loop import LossOut, autocast_for


def sequence_logps(
    model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed log-probability of the labelled tokens, and the number of labelled tokens per row."""
    out = model(input_ids=input_ids, use_cache=False)
    logits = out.logits[:, :-1, :].float()
    targets = labels[:, 1:]
    nll = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    )
    mask = targets != IGNORE_INDEX
    return -(nll.view(targets.shape) * mask).sum(-1), mask.sum(-1)


def dpo(beta: float, label_smoothing: float = 0.0) -> Callable[[torch.nn.Module, dict[str, torch.Tensor]], LossOut]:
    def objective(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossOut:
        logps, _ = sequence_logps(model, batch["input_ids"], batch["labels"])
        b = logps.shape[0] // 2
        chosen_ratio = logps[:b] - batch["ref_chosen"]
        rejected_ratio = logps[b:] - batch["ref_rejected"]
        logits = beta * (chosen_ratio - rejected_ratio)
        losses = -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing
        return LossOut(
            losses.sum(),
            torch.tensor(b, device=logps.device),
            _reward_metrics(beta * chosen_ratio, beta * rejected_ratio),
        )

    return objective


def orpo(beta: float) -> Callable[[torch.nn.Module, dict[str, torch.Tensor]], LossOut]:
    def objective(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossOut:
        logps, n = sequence_logps(model, batch["input_ids"], batch["labels"])
        b = logps.shape[0] // 2
        avg = logps / n.clamp(min=1)
        chosen, rejected = avg[:b], avg[b:]
        # log odds(y) = log p - log(1 - p) with p the length-normalised sequence probability
        log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
        losses = -chosen - beta * F.logsigmoid(log_odds)
        metrics = _reward_metrics(beta * chosen, beta * rejected)
        metrics["log_odds_ratio"] = log_odds.detach().sum()
        metrics["nll"] = -chosen.detach().sum()
        return LossOut(losses.sum(), torch.tensor(b, device=logps.device), metrics)

    return objective


def kto(
    beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
) -> Callable[[torch.nn.Module, dict[str, torch.Tensor]], LossOut]:
    """KTO on paired data: the chosen reply is desirable, the rejected one undesirable. The reference point z0 is
    the batch's KL estimate on mismatched pairs (prompt i with the chosen reply of pair i+1), as in the paper."""

    def objective(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossOut:
        logps, _ = sequence_logps(model, batch["input_ids"], batch["labels"])
        b = logps.shape[0] // 2
        chosen_ratio = logps[:b] - batch["ref_chosen"]
        rejected_ratio = logps[b:] - batch["ref_rejected"]
        # mismatched pairs (prompt i with the chosen reply of pair i+1): the KL estimate, with no gradient
        with torch.no_grad():
            kl_logps, _ = sequence_logps(model, batch["kl_input_ids"], batch["kl_labels"])
            z0 = (kl_logps - batch["ref_kl"]).mean().clamp(min=0)
        losses = torch.cat(
            [
                desirable_weight * (1 - torch.sigmoid(beta * (chosen_ratio - z0))),
                undesirable_weight * (1 - torch.sigmoid(beta * (z0 - rejected_ratio))),
            ]
        )
        metrics = _reward_metrics(beta * chosen_ratio, beta * rejected_ratio)
        metrics["kl"] = z0.detach() * b
        return LossOut(losses.sum() / 2, torch.tensor(b, device=logps.device), metrics)

    return objective


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable near 0."""
    x = x.clamp(max=-1e-6)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _reward_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    chosen, rejected = chosen.detach(), rejected.detach()
    return {
        "rewards_chosen": chosen.sum(),
        "rewards_rejected": rejected.sum(),
        "reward_margin": (chosen - rejected).sum(),
        "reward_accuracy": (chosen > rejected).float().sum(),
    }


@torch.no_grad()
def add_reference_logps(
    model: torch.nn.Module,
    dataset: PreferenceDataset,
    *,
    device: torch.device,
    batch_size: int,
    pad_id: int,
    precision: str = "auto",
) -> None:
    """Score every pair with the (still untrained) model and store the log-probs on the dataset."""
    was_training = model.training
    model.eval()
    n = len(dataset)
    chosen, rejected, kl_ref = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, collate_fn=lambda items: collate_preferences(items, pad_id)
    )
    with autocast_for(device, precision):
        for batch in loader:
            logps, _ = sequence_logps(model, batch["input_ids"].to(device), batch["labels"].to(device))
            b = logps.shape[0] // 2
            idx = batch["index"]
            chosen[idx], rejected[idx] = logps[:b].float().cpu(), logps[b:].float().cpu()
            if dataset.kl:
                kl_logps, _ = sequence_logps(model, batch["kl_input_ids"].to(device), batch["kl_labels"].to(device))
                kl_ref[idx] = kl_logps.float().cpu()
    dataset.ref_chosen, dataset.ref_rejected = chosen, rejected
    dataset.ref_kl = kl_ref if dataset.kl else None
    model.train(was_training)


# ---------------------------------------------------------------- GRPO (online, with a user reward function)


class PromptDataset(torch.utils.data.Dataset):
    """Prompts (chat messages ending with a user turn) rendered with the generation prompt, for GRPO."""

    def __init__(self, tokenizer, records: list[dict], max_prompt_len: int):  # noqa: ANN001 - a HF tokenizer
        from kollm.train.data import render

        self.records = records
        self.prompt_ids = []
        for rec in records:
            text = render(tokenizer, rec["prompt"], add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            self.prompt_ids.append(ids[-max_prompt_len:])

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        return {"ids": self.prompt_ids[i], "index": i}


def collate_prompts(items: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts (generation appends on the right)."""
    width = max(len(it["ids"]) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for r, it in enumerate(items):
        ids[r, width - len(it["ids"]) :] = torch.tensor(it["ids"], dtype=torch.long)
        mask[r, width - len(it["ids"]) :] = 1
    return {"input_ids": ids, "attention_mask": mask, "index": torch.tensor([it["index"] for it in items])}


def grpo(
    tokenizer,  # noqa: ANN001 - a HF tokenizer
    dataset: PromptDataset,
    reward_fn: Callable[..., list[float]],
    *,
    num_generations: int,
    max_new_tokens: int,
    temperature: float,
    stop_ids: list[int],
) -> Callable[[torch.nn.Module, dict[str, torch.Tensor]], LossOut]:
    """Group Relative Policy Optimization, one policy-gradient update per generated group (so the PPO ratio is
    1 and needs no clipping) and no KL term (TRL's default beta=0): each prompt gets `num_generations`
    sampled replies, scored by `reward_fn(prompts=..., completions=..., **other_columns)`; a reply's advantage
    is its reward standardised within its group; the loss is -advantage x mean token log-prob of the reply."""
    pad_id = tokenizer.pad_token_id

    def objective(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossOut:
        prompts = batch["input_ids"]
        width = prompts.shape[1]
        with torch.no_grad():
            out = causal_lm(model).generate(
                input_ids=prompts,
                attention_mask=batch["attention_mask"],
                do_sample=True,
                temperature=temperature,
                top_k=0,
                max_new_tokens=max_new_tokens,
                num_return_sequences=num_generations,
                eos_token_id=stop_ids,
                pad_token_id=pad_id,
            )
        completions = out[:, width:]
        records = [dataset.records[int(i)] for i in batch["index"] for _ in range(num_generations)]
        texts, seqs = [], []
        for r, row in enumerate(completions.tolist()):
            cut = next((k + 1 for k, t in enumerate(row) if t in stop_ids), len(row))
            reply = row[:cut]
            texts.append(tokenizer.decode([t for t in reply if t not in stop_ids], skip_special_tokens=True))
            p = [
                t
                for t, m in zip(
                    prompts[r // num_generations].tolist(), batch["attention_mask"][r // num_generations].tolist()
                )
                if m
            ]
            seqs.append((p, reply))
        extra = {k: [rec[k] for rec in records] for k in records[0] if k != "prompt"}
        rewards = torch.tensor(
            reward_fn(prompts=[rec["prompt"] for rec in records], completions=texts, **extra),
            dtype=torch.float32,
            device=prompts.device,
        )
        if rewards.shape != (len(texts),):
            raise ValueError(f"the reward function returned {tuple(rewards.shape)} values for {len(texts)} completions")
        grouped = rewards.view(-1, num_generations)
        adv = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)
        length = max(len(p) + len(c) for p, c in seqs)
        ids = torch.full((len(seqs), length), pad_id, dtype=torch.long, device=prompts.device)
        labels = torch.full_like(ids, IGNORE_INDEX)
        for r, (p, c) in enumerate(seqs):
            ids[r, : len(p) + len(c)] = torch.tensor(p + c, device=prompts.device)
            labels[r, len(p) : len(p) + len(c)] = torch.tensor(c, device=prompts.device)
        logps, n = sequence_logps(model, ids, labels)
        losses = -adv * logps / n.clamp(min=1)
        metrics = {
            "reward": rewards.sum(),
            "reward_std": grouped.std(1).sum() * num_generations,
            "completion_length": n.float().sum(),
        }
        return LossOut(losses.sum(), torch.tensor(len(seqs), device=prompts.device), metrics)

    return objective
