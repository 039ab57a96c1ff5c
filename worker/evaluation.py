"""Scoring preference pairs with a model: does it prefer the chosen answer, and by how much?

A model's score of an answer is the sum of the log-probabilities of the answer's tokens
given the prompt, both rendered with the tokenizer's chat template. Over held-out pairs:

- log-probability margin: score(chosen) - score(rejected), averaged; preference accuracy is
  the share of pairs where that margin is above zero;
- DPO reward margin of a policy against a reference model, as DPO trains it:
  β × [(policy(chosen) - reference(chosen)) - (policy(rejected) - reference(rejected))].
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

Message = dict[str, str]


@dataclass(frozen=True)
class PairScores:
    """Per-pair log-probabilities of the chosen and the rejected answer."""

    chosen: list[float]
    rejected: list[float]

    @property
    def margins(self) -> list[float]:
        return [c - r for c, r in zip(self.chosen, self.rejected)]

    @property
    def mean_margin(self) -> float:
        return sum(self.margins) / len(self.margins)

    @property
    def accuracy(self) -> float:
        return sum(margin > 0 for margin in self.margins) / len(self.margins)


@dataclass(frozen=True)
class RewardReport:
    mean_margin: float
    accuracy: float


def _encode(
    tokenizer: PreTrainedTokenizerBase, prompt: list[Message], answer: Message, max_length: int
) -> tuple[list[int], int]:
    """Return the token ids of prompt + answer and where the answer starts.

    Prompts that would leave the answer no room are cut from the left, as in training.
    """
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template([*prompt, answer], tokenize=False)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    answer_ids = full_ids[len(prompt_ids) :]
    if len(answer_ids) >= max_length:
        # An answer longer than the limit keeps its start and leaves half the room to the prompt.
        answer_ids = answer_ids[: max_length // 2]
    room = max_length - len(answer_ids)
    prompt_ids = prompt_ids[-room:] if room > 0 else []
    return prompt_ids + answer_ids, len(prompt_ids)


@torch.no_grad()
def answer_logprobs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[Message]],
    answers: Sequence[Message],
    max_length: int = 512,
    batch_size: int = 8,
) -> list[float]:
    """Return, for each prompt and answer, the summed log-probability of the answer tokens."""
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores: list[float] = []
    for start in range(0, len(prompts), batch_size):
        encoded = [
            _encode(tokenizer, prompt, answer, max_length)
            for prompt, answer in zip(prompts[start : start + batch_size], answers[start : start + batch_size])
        ]
        width = max(len(ids) for ids, _ in encoded)
        input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(encoded), width), dtype=torch.long)
        answer_mask = torch.zeros((len(encoded), width), dtype=torch.bool)
        for row, (ids, answer_start) in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
            answer_mask[row, answer_start : len(ids)] = True

        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
        # Token t is predicted by the logits at t - 1; take log-softmax one row at a time so
        # that the full-vocabulary tensor is never held in float32 for the whole batch.
        for row in range(len(encoded)):
            row_logits = logits[row, :-1].float()
            targets = input_ids[row, 1:].to(device)
            token_logprobs = torch.log_softmax(row_logits, dim=-1).gather(1, targets[:, None])[:, 0]
            mask = answer_mask[row, 1:].to(device)
            scores.append(float(token_logprobs[mask].sum()))
    return scores


def score_pairs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[dict],
    max_length: int = 512,
    batch_size: int = 8,
) -> PairScores:
    """Score TRL conversational pairs (`prompt`, `chosen`, `rejected` message lists)."""
    prompts = [pair["prompt"] for pair in pairs]
    chosen = answer_logprobs(
        model, tokenizer, prompts, [pair["chosen"][-1] for pair in pairs], max_length, batch_size
    )
    rejected = answer_logprobs(
        model, tokenizer, prompts, [pair["rejected"][-1] for pair in pairs], max_length, batch_size
    )
    return PairScores(chosen, rejected)


def dpo_reward(policy: PairScores, reference: PairScores, beta: float) -> RewardReport:
    """Return DPO's implicit reward margin and accuracy of `policy` against `reference`."""
    margins = [
        beta * ((pc - rc) - (pr - rr))
        for pc, pr, rc, rr in zip(policy.chosen, policy.rejected, reference.chosen, reference.rejected)
    ]
    return RewardReport(
        mean_margin=sum(margins) / len(margins),
        accuracy=sum(margin > 0 for margin in margins) / len(margins),
    )


@torch.no_grad()
def greedy_answer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: list[Message],
    max_new_tokens: int = 64,
) -> str:
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    inputs = {name: tensor.to(next(model.parameters()).device) for name, tensor in inputs.items()}
    output = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
