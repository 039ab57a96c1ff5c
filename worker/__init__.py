"""Celery worker side of the service: model imports and the training child process."""
