"""A DPOTrainer that is faster and smaller on the CPU: a compact LM head and length-grouped batches.

TRL 1.16 already projects hidden states through the LM head in tiles instead of materialising
the `[batch, seq, vocab]` logits. On devices without Triton (the CPU), though, it scores every
position, prompt and padding included, in tiles of up to 4,096 tokens by 32,768 vocabulary
entries, and folds each tile with about ten full-size temporaries. `ChunkedLMHead` scores only
the completion tokens, whose log-probabilities DPO uses, in chunks of `chunk_tokens` tokens by
the whole vocabulary, with a logsumexp and a gather, and recomputes each chunk in the backward
pass. Length grouping (`train_sampling_strategy="group_by_length"`) is served by
`LengthBucketSampler`, which shuffles with the seed instead of sorting the whole data set.
"""

import logging
import types
from dataclasses import dataclass
from functools import wraps

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset
from torch.utils.data import Sampler, SequentialSampler
from transformers import PreTrainedModel, Trainer
from trl import DPOTrainer
from trl.trainer.utils import FusedCausalLMOutput

from worker.training.batching import PAIR_COLUMNS, LengthBucketSampler, pair_lengths

logger = logging.getLogger(__name__)

# Tokens per chunk of logits: 512 × 49,152 (SmolLM2's vocabulary) × 4 bytes is about 100 MB.
# The forward pass holds up to three buffers of that size at a time, the backward pass one.
DEFAULT_CHUNK_TOKENS = 512
# Per-token fields that DPOTrainer reads from the fused head for its logged metrics.
METRIC_FIELDS = ("entropy", "mean_logits", "is_top1")


@dataclass(frozen=True)
class DPOSpeedups:
    """The optimisations `FastDPOTrainer` applies, each of which can be switched off to measure it."""

    chunked_lm_head: bool = True
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS


class ChunkedTokenLogProbs(torch.autograd.Function):
    """Log-probabilities of `targets` under `softmax(hidden @ weight.T)`, one token chunk at a time.

    Inputs: `hidden` [tokens, hidden size], `weight` [vocab, hidden size], `targets` [tokens].
    The forward pass keeps only the per-token logsumexp. The backward pass recomputes the logits
    of one chunk, turns them into `grad * (onehot(target) - softmax)` in place and multiplies by
    `weight`, so no more than one chunk of logits exists at a time.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens, metric_fields):
        token_count = hidden.shape[0]
        # Softmax statistics in at least fp32, also when the matrix products run in bf16.
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        log_probs = hidden.new_empty(token_count, dtype=dtype)
        metrics = {name: None for name in METRIC_FIELDS}
        if "entropy" in metric_fields:
            metrics["entropy"] = hidden.new_empty(token_count, dtype=dtype)
        if "mean_logits" in metric_fields:
            metrics["mean_logits"] = hidden.new_empty(token_count, dtype=dtype)
        if "is_top1" in metric_fields:
            metrics["is_top1"] = torch.empty(token_count, dtype=torch.bool, device=hidden.device)
        log_normalizers = hidden.new_empty(token_count, dtype=dtype)

        for start in range(0, token_count, chunk_tokens):
            end = min(start + chunk_tokens, token_count)
            logits = (hidden[start:end] @ weight.t()).to(dtype)
            chunk_targets = targets[start:end]
            if metrics["mean_logits"] is not None:
                metrics["mean_logits"][start:end] = logits.mean(dim=-1)
            if metrics["is_top1"] is not None:
                # argmax returns the first maximum, as TRL's fused head counts ties.
                metrics["is_top1"][start:end] = logits.argmax(dim=-1) == chunk_targets
            log_normalizer = torch.logsumexp(logits, dim=-1)
            log_normalizers[start:end] = log_normalizer
            target_logits = logits.gather(1, chunk_targets[:, None])[:, 0]
            log_probs[start:end] = target_logits - log_normalizer
            if metrics["entropy"] is not None:
                # The logits become log p in place; entropy = -sum(p * log p).
                logits.sub_(log_normalizer[:, None])
                metrics["entropy"][start:end] = -(logits.exp() * logits).sum(dim=-1)
            del logits

        ctx.save_for_backward(hidden, weight, targets, log_normalizers)
        ctx.chunk_tokens = chunk_tokens
        ctx.mark_non_differentiable(*(value for value in metrics.values() if value is not None))
        ctx.set_materialize_grads(False)
        return log_probs, metrics["entropy"], metrics["mean_logits"], metrics["is_top1"]

    @staticmethod
    def backward(ctx, grad_log_probs, *unused_metric_grads):
        hidden, weight, targets, log_normalizers = ctx.saved_tensors
        if grad_log_probs is None:
            return None, None, None, None, None
        needs_hidden_grad, needs_weight_grad = ctx.needs_input_grad[:2]
        dtype = log_normalizers.dtype
        grad_hidden = torch.zeros_like(hidden, dtype=dtype) if needs_hidden_grad else None
        grad_weight = torch.zeros_like(weight, dtype=dtype) if needs_weight_grad else None
        chunk_tokens = ctx.chunk_tokens
        rows = torch.arange(min(chunk_tokens, hidden.shape[0]), device=hidden.device)

        for start in range(0, hidden.shape[0], chunk_tokens):
            end = min(start + chunk_tokens, hidden.shape[0])
            chunk_grad = grad_log_probs[start:end].to(dtype)
            # d log p(target) / d logit_j = onehot(target)_j - p_j, scaled by the incoming gradient.
            grad_logits = (hidden[start:end] @ weight.t()).to(dtype)
            grad_logits.sub_(log_normalizers[start:end, None]).exp_()
            grad_logits.mul_(-chunk_grad[:, None])
            grad_logits[rows[: end - start], targets[start:end]] += chunk_grad
            grad_logits = grad_logits.to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[start:end] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t().to(dtype), hidden[start:end].to(dtype))
            del grad_logits

        return (
            grad_hidden.to(hidden.dtype) if grad_hidden is not None else None,
            grad_weight.to(weight.dtype) if grad_weight is not None else None,
            None,
            None,
            None,
        )


def chunked_token_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    metric_fields: tuple[str, ...] = (),
) -> tuple[torch.Tensor, ...]:
    """Return per-token log-probabilities and the requested metric fields (None otherwise)."""
    return ChunkedTokenLogProbs.apply(hidden, weight, targets, chunk_tokens, metric_fields)


def chunked_head_supported(model: PreTrainedModel) -> bool:
    """Return whether the model's logits are a plain, bias-free projection of its hidden states.

    Models with logit soft-capping or scaling, an LM head bias, or router logits (mixture of
    experts) keep TRL's fused head, which handles them.
    """
    config = model.config.get_text_config()
    for name in ("final_logit_softcapping", "logit_scale", "output_multiplier",
                 "lm_head_multiplier", "logits_scaling"):
        if getattr(config, name, None) not in (None, 1.0):
            return False
    if hasattr(config, "output_router_logits"):
        return False
    head = model.get_output_embeddings()
    return head is not None and getattr(head, "bias", None) is None


def add_chunked_lm_head(model: PreTrainedModel, chunk_tokens: int, metric_fields: tuple[str, ...]):
    """Replace the `fused_lm_head=True` forward of `model` with one that scores labelled tokens only.

    The returned `FusedCausalLMOutput` has the fields and shapes of TRL 1.16's fused head:
    per-token values of shape `[batch, seq - 1]` for the next-token labels, zero where the label
    is -100. Calls without `fused_lm_head=True`, such as generation, run the previous forward.
    """
    previous_forward = model.forward

    @wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, **kwargs):
        if not fused_lm_head:
            if labels is not None:
                kwargs["labels"] = labels
            return previous_forward(*args, **kwargs)

        kwargs["use_cache"] = False
        kwargs.pop("num_items_in_batch", None)
        hidden_states = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        labels = labels[:, 1:]
        mask = labels != -100
        head = self.get_output_embeddings()
        per_token = chunked_token_log_probs(
            hidden_states[mask], head.weight, labels[mask], chunk_tokens, metric_fields
        )
        # masked_scatter keeps the result connected to the graph even when no label is valid.
        log_probs, entropy, mean_logits, is_top1 = (
            None if value is None else value.new_zeros(mask.shape).masked_scatter(mask, value)
            for value in per_token
        )
        loss = -log_probs.sum() / mask.sum().clamp(min=1)
        return FusedCausalLMOutput(
            loss=loss,
            log_probs=log_probs,
            entropy=entropy,
            mean_logits=mean_logits,
            is_top1=is_top1,
            label_mask=mask,
        )

    model.forward = types.MethodType(forward, model)


def install_chunked_lm_head(
    trainer: Trainer, chunk_tokens: int, metric_fields: tuple[str, ...]
) -> None:
    """Give the trainer's model the chunked head, on the CPU and where the model allows it."""
    # NOTE: on CUDA, TRL 1.16 already scores only the labelled positions with a Triton
    # kernel, so the chunked head is used on the CPU only.
    if trainer.accelerator.device.type != "cpu":
        return
    model = trainer.model
    if is_peft_model(model):
        model = model.get_base_model()
    if not chunked_head_supported(model):
        logger.info("keeping TRL's fused LM head: %s scales or caps its logits", type(model))
        return
    add_chunked_lm_head(model, chunk_tokens, metric_fields)


class FastDPOTrainer(DPOTrainer):
    """TRL's DPOTrainer with the compact LM head on the CPU and seeded length-grouped batches.

    The loss, its variants and the logged metrics are TRL's own: only the computation of the
    per-token log-probabilities and the order of the training pairs change.
    """

    def __init__(self, *args, speedups: DPOSpeedups = DPOSpeedups(), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.speedups = speedups
        if not speedups.chunked_lm_head:
            return
        on_cpu = self.accelerator.device.type == "cpu"
        if on_cpu and (self.use_weighting or self.ref_model is not None):
            logger.info("keeping TRL's fused LM head: WPO weighting or a separate reference model")
            return
        install_chunked_lm_head(self, speedups.chunk_tokens, METRIC_FIELDS)

    def _get_train_sampler(self, train_dataset=None) -> Sampler | None:
        """Serve `train_sampling_strategy="group_by_length"` with `LengthBucketSampler`."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if (
            self.args.train_sampling_strategy != "group_by_length"
            or not isinstance(dataset, Dataset)
            or not set(PAIR_COLUMNS) <= set(dataset.column_names)
        ):
            return super()._get_train_sampler(train_dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        # Buckets of the global batch, which accelerate cuts into one per-device batch per
        # process, so several processes train on the same batches as one process would.
        global_batch_size = self.args.per_device_train_batch_size * self.args.world_size
        return LengthBucketSampler(pair_lengths(dataset), batch_size=global_batch_size, seed=seed)

    def _get_eval_sampler(self, eval_dataset) -> Sampler | None:
        """Evaluate in data set order: length grouping applies to training batches only."""
        if self.args.train_sampling_strategy == "group_by_length":
            return SequentialSampler(eval_dataset)
        return super()._get_eval_sampler(eval_dataset)
