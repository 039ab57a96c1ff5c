"""Training data: loading, validation, the SFT sample and prompt truncation.

Every row ends up in TRL's conversational formats: preference pairs
`{"prompt": [messages], "chosen": [assistant message], "rejected": [assistant message]}` for DPO,
and prompt-completion rows `{"prompt": [messages], "completion": [assistant message]}` for SFT,
so that TRL computes the SFT loss on completion tokens only.
"""

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from app.validation import PreferencePairError, parse_pair
from worker.training.errors import DataError

logger = logging.getLogger(__name__)

Messages = list[dict[str, str]]


@dataclass
class TrainingData:
    """The rows of both phases, validated and fitted to the maximum sequence length."""

    source: str
    sft_rows: list[dict[str, Messages]]
    dpo_rows: list[dict[str, Messages]]


def load_pairs_file(path: Path) -> list[dict[str, Messages]]:
    """Read a JSONL file of preference pairs, raising DataError that names the first bad line."""
    if not path.is_file():
        raise DataError(f"the pairs file {path} does not exist")
    pairs = []
    with path.open(encoding="utf-8") as stream:
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                pairs.append(parse_pair(json.loads(line)).to_trl())
            except (json.JSONDecodeError, PreferencePairError) as exc:
                raise DataError(f"invalid preference pair in {path.name} line {number}: {exc}")
    if not pairs:
        raise DataError(f"the pairs file {path.name} contains no preference pairs")
    return pairs


def sample_sft_rows(
    pairs: list[dict[str, Messages]], ratio: float, seed: int
) -> list[dict[str, Messages]]:
    """Return prompt-completion rows from the chosen answers of a seeded `ratio` of the pairs.

    At least one pair is used, and the sample keeps the order of the file.
    """
    count = min(len(pairs), max(1, round(len(pairs) * ratio)))
    indices = sorted(random.Random(seed).sample(range(len(pairs)), count))
    return [{"prompt": pairs[i]["prompt"], "completion": pairs[i]["chosen"]} for i in indices]


def _load_rows(name: str) -> list[dict[str, Any]]:
    """Load the train split (or the only split) of a Hugging Face data set or local path."""
    import datasets

    try:
        loaded = datasets.load_dataset(name)
    # `load_dataset` raises many unrelated types (missing repo, offline cache miss, bad
    # files), and each of them means this data set cannot be used.
    except Exception as exc:
        raise DataError(f"the data set {name!r} could not be loaded: {exc}") from exc
    if isinstance(loaded, datasets.DatasetDict):
        if "train" in loaded:
            loaded = loaded["train"]
        elif len(loaded) == 1:
            loaded = next(iter(loaded.values()))
        else:
            splits = ", ".join(loaded)
            raise DataError(f"the data set {name!r} has no train split (splits: {splits})")
    if len(loaded) == 0:
        raise DataError(f"the data set {name!r} is empty")
    return list(loaded)


def load_hub_pairs(name: str) -> list[dict[str, Messages]]:
    """Load preference pairs in any accepted upload format from a Hugging Face data set."""
    pairs = []
    for index, row in enumerate(_load_rows(name)):
        try:
            pairs.append(parse_pair(row).to_trl())
        except PreferencePairError as exc:
            raise DataError(f"invalid preference pair in data set {name!r} row {index}: {exc}")
    return pairs


def load_hub_conversations(name: str) -> list[dict[str, Messages]]:
    """Load SFT rows from a `messages` column or from `prompt` and `completion` columns.

    A conversation gives one prompt-completion row per assistant message, so every
    assistant turn is trained on and the loss still covers completion tokens only.
    """
    rows = []
    for index, row in enumerate(_load_rows(name)):
        try:
            if "messages" in row:
                rows.extend(_split_conversation(row["messages"]))
            elif "prompt" in row and "completion" in row:
                rows.append(_prompt_completion(row["prompt"], row["completion"]))
            else:
                columns = ", ".join(row)
                raise ValueError(
                    f"has columns {columns}, but an SFT data set needs a `messages` column or"
                    " `prompt` and `completion` columns"
                )
        except ValueError as exc:
            raise DataError(f"invalid SFT row in data set {name!r} row {index}: {exc}") from exc
    if not rows:
        raise DataError(f"the data set {name!r} has no assistant messages to train on")
    return rows


def _check_messages(messages: Any, field_name: str) -> Messages:
    if not isinstance(messages, list) or not all(
        isinstance(message, dict)
        and message.get("role") in ("system", "user", "assistant")
        and isinstance(message.get("content"), str)
        for message in messages
    ):
        raise ValueError(
            f"{field_name} must be a list of messages with a role (system, user or assistant)"
            " and string content"
        )
    return [{"role": message["role"], "content": message["content"]} for message in messages]


def _split_conversation(messages: Any) -> list[dict[str, Messages]]:
    messages = _check_messages(messages, "messages")
    return [
        {"prompt": messages[:index], "completion": [message]}
        for index, message in enumerate(messages)
        if message["role"] == "assistant" and index > 0
    ]


def _prompt_completion(prompt: Any, completion: Any) -> dict[str, Messages]:
    if isinstance(prompt, str) and isinstance(completion, str):
        return {
            "prompt": [{"role": "user", "content": prompt}],
            "completion": [{"role": "assistant", "content": completion}],
        }
    prompt = _check_messages(prompt, "prompt")
    completion = _check_messages(completion, "completion")
    if len(completion) != 1 or completion[0]["role"] != "assistant":
        raise ValueError("completion must be one assistant message")
    return {"prompt": prompt, "completion": completion}


def count_tokens(
    tokenizer: PreTrainedTokenizerBase, messages: Messages, add_generation_prompt: bool = False
) -> int:
    """Count the tokens of `messages` rendered with the tokenizer's chat template."""
    encoded = tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=True
    )
    return len(encoded["input_ids"])


def fit_prompt(
    tokenizer: PreTrainedTokenizerBase,
    prompt: Messages,
    completions: list[Messages],
    max_length: int,
) -> Messages | None:
    """Shorten `prompt` from the left so that the longest completion fits in `max_length` tokens.

    Up to half of `max_length` is kept for the response. Oldest messages go first (the system
    message last), then the start of the last remaining message is cut token by token. Returns the
    prompt unchanged when it already fits, or None when even an empty message leaves no room.
    """
    prompt_tokens = count_tokens(tokenizer, prompt, add_generation_prompt=True)
    response_tokens = max(
        count_tokens(tokenizer, prompt + completion) - prompt_tokens for completion in completions
    )
    budget = max_length - min(response_tokens, max_length // 2)
    if prompt_tokens + response_tokens <= max_length or prompt_tokens <= budget:
        return prompt

    messages = list(prompt)
    while len(messages) > 1 and prompt_tokens > budget:
        drop = 1 if messages[0]["role"] == "system" and len(messages) > 2 else 0
        del messages[drop]
        prompt_tokens = count_tokens(tokenizer, messages, add_generation_prompt=True)
    if prompt_tokens <= budget:
        return messages

    last = messages[-1]
    content_ids = tokenizer(last["content"], add_special_tokens=False)["input_ids"]
    keep = len(content_ids) - (prompt_tokens - budget)
    # Decoding a token suffix and encoding it again can change the count by a few tokens.
    for _ in range(8):
        if keep <= 0:
            return None
        text = tokenizer.decode(content_ids[-keep:])
        messages[-1] = {"role": last["role"], "content": text}
        prompt_tokens = count_tokens(tokenizer, messages, add_generation_prompt=True)
        if prompt_tokens <= budget:
            return messages
        keep -= prompt_tokens - budget
    return None


def fit_rows(
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict[str, Messages]],
    completion_keys: tuple[str, ...],
    max_length: int,
) -> tuple[list[dict[str, Messages]], int, int]:
    """Fit every row's prompt.

    Return the rows that fit, the number of truncated prompts and the number of dropped rows.
    """
    fitted, truncated, dropped = [], 0, 0
    for row in rows:
        completions = [row[key] for key in completion_keys]
        prompt = fit_prompt(tokenizer, row["prompt"], completions, max_length)
        if prompt is None:
            dropped += 1
            continue
        if prompt is not row["prompt"]:
            truncated += 1
        fitted.append({**row, "prompt": prompt})
    return fitted, truncated, dropped
