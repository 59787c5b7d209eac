"""In-process fixtures: the app factory with a fake backend (gateway_fakes.FakeBackend)."""
import pytest
from gateway_fakes import FakeBackend
from testkit import KEY

from gateway import create_app


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def make_app(backend):
    """``make_app(**config)``: the gateway with the one test key, the fake backend (or
    ``backend=``) and config overrides; ``API_KEY=None`` leaves the key out."""

    def make(backend=backend, **config):
        return create_app({"API_KEY": KEY, **config}, backend=backend)

    return make


@pytest.fixture
def client(make_app):
    return make_app().test_client()
