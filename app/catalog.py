"""The model catalog: which base models a run may use, and their price."""

from app.errors import ApiError
from app.settings import CatalogModel, Settings


def catalog_model(settings: Settings, base_model: str) -> CatalogModel:
    """Return the catalog entry of `base_model`, or raise 400 listing the available models."""
    entry = settings.model_catalog.get(base_model)
    if entry is None:
        available = ", ".join(sorted(settings.model_catalog))
        raise ApiError(
            400,
            f"Invalid request: base_model {base_model!r} is not in this server's model "
            f"catalog. Available models: {available}.",
        )
    return entry
