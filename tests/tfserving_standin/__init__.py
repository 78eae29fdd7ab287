"""A TensorFlow Serving stand-in (REST + gRPC) for tests; run as a separate process, see ``server.py``."""
from .fixtures import StandIn

__all__ = ["StandIn"]
