"""The training speed-ups keep the results: chunked log-probabilities and length-grouped batches."""

from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from torch.utils.data import SequentialSampler
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from tests.test_training import real_pairs
from tests.tiny_model import tiny_model_dir  # noqa: F401 (fixture)
from worker.training.batching import LengthBucketSampler, pair_lengths
from worker.training.environment import MALLOC_SETTINGS, training_environment
from worker.training.fast_dpo import (
    DPOSpeedups,
    FastDPOTrainer,
    chunked_head_supported,
    chunked_token_log_probs,
)
from worker.training.fast_sft import FastSFTTrainer

TOLERANCE = 1e-5


def reference_log_probs(hidden, weight, targets):
    """Unchunked: the whole log-softmax over the vocabulary, then a gather."""
    log_softmax = torch.log_softmax(hidden @ weight.t(), dim=-1)
    return log_softmax.gather(1, targets[:, None])[:, 0]


@pytest.mark.parametrize("chunk_tokens", [1, 7, 64, 1000])
def test_chunked_log_probs_match_full(chunk_tokens: int):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 16, generator=generator, dtype=torch.float64)
    weight = torch.randn(300, 16, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 300, (50,), generator=generator)
    upstream = torch.randn(50, generator=generator, dtype=torch.float64)

    inputs = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    expected = reference_log_probs(*inputs, targets)
    (expected * upstream).sum().backward()
    chunked_inputs = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    log_probs, entropy, mean_logits, is_top1 = chunked_token_log_probs(
        *chunked_inputs, targets, chunk_tokens, ("entropy", "mean_logits", "is_top1")
    )
    (log_probs * upstream).sum().backward()

    assert (log_probs - expected).abs().max() < TOLERANCE
    assert (chunked_inputs[0].grad - inputs[0].grad).abs().max() < TOLERANCE
    assert (chunked_inputs[1].grad - inputs[1].grad).abs().max() < TOLERANCE
    logits = hidden @ weight.t()
    probabilities = torch.softmax(logits, dim=-1)
    expected_entropy = -(probabilities * probabilities.log()).sum(dim=-1)
    assert (entropy - expected_entropy).abs().max() < TOLERANCE
    assert (mean_logits - logits.mean(dim=-1)).abs().max() < TOLERANCE
    assert torch.equal(is_top1, logits.argmax(dim=-1) == targets)


def test_chunked_log_probs_gradcheck():
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(6, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (6,), generator=generator)

    def log_probs(hidden, weight):
        return chunked_token_log_probs(hidden, weight, targets, 4)[0]

    assert torch.autograd.gradcheck(log_probs, (hidden, weight))


def tiny_dpo_trainer(model_dir: Path, trainer_class, output_dir: Path, **kwargs) -> DPOTrainer:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = DPOConfig(
        output_dir=str(output_dir),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=4,
        max_length=128,
        report_to="none",
        seed=3,
    )
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    return trainer_class(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(real_pairs(4)),
        processing_class=tokenizer,
        peft_config=lora,
        **kwargs,
    )


def trained_lora_gradients(trainer: Trainer, batch: dict) -> tuple[float, dict]:
    trainer.model.train()
    trainer.model.zero_grad()
    # A LoRA B matrix starts at zero, so give the adapter weights to make the policy differ
    # from the reference and every LoRA gradient non-zero.
    torch.manual_seed(5)
    with torch.no_grad():
        for name, parameter in trainer.model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn_like(parameter) * 0.05)
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    gradients = {
        name: parameter.grad.clone()
        for name, parameter in trainer.model.named_parameters()
        if parameter.grad is not None
    }
    return loss.item(), gradients


def assert_same_loss_and_gradients(plain: Trainer, fast: Trainer, batch: dict) -> None:
    """Assert that both trainers give the same loss and LoRA gradients on `batch`."""
    plain_loss, plain_gradients = trained_lora_gradients(plain, batch)
    fast_loss, fast_gradients = trained_lora_gradients(fast, batch)

    assert abs(plain_loss - fast_loss) < TOLERANCE
    assert plain_gradients.keys() == fast_gradients.keys()
    assert plain_gradients
    largest = max((plain_gradients[k] - fast_gradients[k]).abs().max() for k in plain_gradients)
    assert largest < TOLERANCE


def test_fast_trainer_loss_matches_trl(tmp_path: Path, tiny_model_dir: Path):  # noqa: F811
    plain = tiny_dpo_trainer(tiny_model_dir, DPOTrainer, tmp_path / "plain")
    fast = tiny_dpo_trainer(
        tiny_model_dir, FastDPOTrainer, tmp_path / "fast", speedups=DPOSpeedups(chunk_tokens=5)
    )
    batch = plain.data_collator([plain.train_dataset[i] for i in range(4)])
    base_model = fast.model.get_base_model()
    assert chunked_head_supported(base_model)
    assert "add_chunked_lm_head" in base_model.forward.__func__.__code__.co_qualname

    assert_same_loss_and_gradients(plain, fast, batch)
    plain_metrics = {key: values[-1] for key, values in plain._metrics["train"].items()}
    fast_metrics = {key: values[-1] for key, values in fast._metrics["train"].items()}
    assert plain_metrics.keys() == fast_metrics.keys()
    for key, value in plain_metrics.items():
        assert fast_metrics[key] == pytest.approx(value, abs=1e-4), key


def tiny_sft_trainer(
    model_dir: Path, trainer_class, output_dir: Path, packing: bool, **kwargs
) -> SFTTrainer:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = SFTConfig(
        output_dir=str(output_dir),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=2,
        max_length=96,
        packing=packing,
        completion_only_loss=True,
        report_to="none",
        seed=3,
    )
    rows = [{"prompt": pair["prompt"], "completion": pair["chosen"]} for pair in real_pairs(6)]
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    return trainer_class(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora,
        **kwargs,
    )


@pytest.mark.parametrize("packing", [True, False])
def test_fast_sft_trainer_matches_trl(tmp_path: Path, tiny_model_dir: Path, packing: bool):  # noqa: F811
    plain = tiny_sft_trainer(tiny_model_dir, SFTTrainer, tmp_path / "plain", packing)
    fast = tiny_sft_trainer(
        tiny_model_dir, FastSFTTrainer, tmp_path / "fast", packing, chunk_tokens=7
    )
    batch = plain.data_collator([plain.train_dataset[i] for i in range(2)])
    labels = batch["labels"]
    assert (labels == -100).any()
    assert (labels != -100).any()
    base_model = fast.model.get_base_model()
    assert "add_chunked_lm_head" in base_model.forward.__func__.__code__.co_qualname

    assert_same_loss_and_gradients(plain, fast, batch)
    for key in ("entropy", "mean_token_accuracy"):
        plain_value = plain._metrics["train"][key][-1]
        assert fast._metrics["train"][key][-1] == pytest.approx(plain_value, abs=1e-4), key


@pytest.mark.parametrize(("count", "batch_size"), [(1, 8), (8, 8), (37, 4), (100, 3)])
def test_length_buckets_keep_every_pair_once(count: int, batch_size: int):
    lengths = [(index * 37) % 101 for index in range(count)]
    sampler = LengthBucketSampler(lengths, batch_size=batch_size, seed=7, window_batches=2)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        indices = list(sampler)
        assert sorted(indices) == list(range(count))
        assert len(sampler) == count


def test_length_buckets_follow_seed():
    lengths = list(range(64))
    first = list(LengthBucketSampler(lengths, batch_size=8, seed=1))
    again = list(LengthBucketSampler(lengths, batch_size=8, seed=1))
    other = list(LengthBucketSampler(lengths, batch_size=8, seed=2))
    assert first == again
    assert first != other


def test_length_buckets_cut_padding():
    lengths = [(index * 37) % 101 for index in range(64)]
    sampler = LengthBucketSampler(lengths, batch_size=8, seed=0)
    batches = sampler.batches()
    assert all(len(batch) == 8 for batch in batches)
    grouped = sum(8 * max(lengths[i] for i in batch) for batch in batches)
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0)).tolist()
    shuffled = sum(8 * max(lengths[i] for i in order[s : s + 8]) for s in range(0, 64, 8))
    assert grouped < 0.7 * shuffled


def test_length_buckets_partial_batch_last():
    sampler = LengthBucketSampler(list(range(21)), batch_size=4, seed=0, window_batches=2)
    sizes = [len(batch) for batch in sampler.batches()]
    assert sizes == [4, 4, 4, 4, 4, 1]


def test_fast_trainer_groups_by_length(tmp_path: Path, tiny_model_dir: Path):  # noqa: F811
    trainer = tiny_dpo_trainer(tiny_model_dir, FastDPOTrainer, tmp_path / "fast")
    trainer.args.train_sampling_strategy = "group_by_length"
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, LengthBucketSampler)
    assert sampler.lengths == pair_lengths(trainer.train_dataset)
    assert sorted(sampler) == list(range(len(trainer.train_dataset)))
    assert isinstance(trainer._get_eval_sampler(trainer.train_dataset), SequentialSampler)


def test_training_environment_keeps_given_values():
    base = {"PATH": "/bin", "MALLOC_ARENA_MAX": "4", "LD_PRELOAD": "/lib/custom.so"}
    environment = training_environment(base)
    assert environment["PATH"] == "/bin"
    assert environment["MALLOC_ARENA_MAX"] == "4"
    assert environment["LD_PRELOAD"] == "/lib/custom.so"
    for key in MALLOC_SETTINGS:
        assert key in environment
