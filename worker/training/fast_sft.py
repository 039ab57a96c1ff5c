"""An SFTTrainer that scores only completion tokens on the CPU, with the chunked LM head.

TRL 1.16's SFTTrainer reads its loss, entropy and token accuracy from the model's
`fused_lm_head=True` outputs, as DPOTrainer does. On the CPU, TRL computes them for every
position, prompt and padding included. With `completion_only_loss`, the chunked head of
`fast_dpo` computes them for the completion tokens only, one chunk of logits at a time. The
loss and the logged metrics stay TRL's own.
"""

from trl import SFTTrainer

from worker.training.fast_dpo import DEFAULT_CHUNK_TOKENS, install_chunked_lm_head

# The per-token fields that SFTTrainer reads for its logged metrics.
SFT_METRIC_FIELDS = ("entropy", "is_top1")


class FastSFTTrainer(SFTTrainer):
    """TRL's SFTTrainer with the chunked LM head on the CPU."""

    def __init__(self, *args, chunk_tokens: int = DEFAULT_CHUNK_TOKENS, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        install_chunked_lm_head(self, chunk_tokens, SFT_METRIC_FIELDS)
