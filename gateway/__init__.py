"""trident's REST gateway: Flask app factory, served by gunicorn with gevent.

    gunicorn -c python:gateway.gunicorn_conf -k gateway.worker.GeventGrpcWorker 'gateway:create_app()'

Importing the package imports nothing else: gunicorn's master imports ``gateway.gunicorn_conf``
and ``gateway.worker`` before any worker exists, and prometheus_client must not be imported
before the config has set ``PROMETHEUS_MULTIPROC_DIR`` (see gateway.gunicorn_conf). Except
gateway.grpc_env (``os`` only): it sets ``GRPC_EXPERIMENTS`` here, before any gateway module
can import ``grpc``, which reads it once, when it starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .grpc_env import use_polling_client

use_polling_client()

if TYPE_CHECKING:
    from flask import Flask


def create_app(config: Any = None, **kwargs: Any) -> Flask:
    """``gateway.app.create_app``, imported on first call."""
    from .app import create_app as _create_app

    return _create_app(config, **kwargs)


__all__ = ["create_app"]
