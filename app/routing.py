"""Registering each API route under both `NAME` and `NAME.php`."""

from collections.abc import Callable

from fastapi import APIRouter


def endpoint(router: APIRouter, name: str, methods: list[str], **options) -> Callable:
    """Serve the decorated function at `/NAME` and, for the official client, `/NAME.php`."""

    def decorator(function: Callable) -> Callable:
        router.add_api_route(f"/{name}", function, methods=methods, **options)
        router.add_api_route(
            f"/{name}.php", function, methods=methods, include_in_schema=False, **options
        )
        return function

    return decorator
