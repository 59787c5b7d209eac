"""trident's REST gateway: Flask app factory, served by gunicorn with gevent.

    gunicorn -k gateway.worker.GeventGrpcWorker 'gateway:create_app()'
"""

from .app import create_app

__all__ = ["create_app"]
