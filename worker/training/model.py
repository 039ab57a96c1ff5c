"""Loading the base model and its tokenizer, and the precision the hardware allows."""

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from worker.model_store import ModelUnavailable
from worker.training.progress import ProgressReporter

# ChatML, used when a tokenizer has no chat template. Its `<|im_start|>` and `<|im_end|>`
# markers are plain text (several tokens each) for a tokenizer that lacks them as special
# tokens, which still separates the turns consistently in training and inference.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def load_tokenizer(
    model_dir: Path, model_name: str, reporter: ProgressReporter
) -> PreTrainedTokenizerBase:
    """Load the tokenizer, and set a pad token and a chat template where the model has none."""
    if not (model_dir / "config.json").is_file():
        reason = "the model directory has no config.json"
        raise ModelUnavailable(model_name, reason, [str(model_dir)])
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise ModelUnavailable(model_name, f"its tokenizer failed to load: {exc}", [str(model_dir)])

    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelUnavailable(
                model_name,
                "its tokenizer has neither a pad token nor an EOS token",
                [str(model_dir)],
            )
        tokenizer.pad_token = tokenizer.eos_token
        reporter.message(
            f"The tokenizer has no pad token, so the EOS token {tokenizer.eos_token!r} pads."
        )
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
        reporter.message(
            "The tokenizer has no chat template, so conversations use ChatML"
            " (<|im_start|>role ... <|im_end|> turns)."
        )
    return tokenizer


def load_model(model_dir: Path, model_name: str) -> torch.nn.Module:
    """Load the base model in fp32 with PyTorch's SDPA attention.

    Mixed precision, where enabled, comes from the trainer's autocast. The fp32 weights keep
    the merged SFT model and the published adapter exact.
    """
    try:
        return AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation="sdpa"
        )
    except (OSError, ValueError) as exc:
        raise ModelUnavailable(model_name, f"its weights failed to load: {exc}", [str(model_dir)])


def bf16_supported(use_cpu: bool) -> bool:
    """Return whether bf16 mixed precision is worth using: a CUDA GPU with bf16 support."""
    # NOTE: the tests run on the CPU only, so bf16 autocast and multi-GPU (NCCL) training
    # have not been run against this code.
    return not use_cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
