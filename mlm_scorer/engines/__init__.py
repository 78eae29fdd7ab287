"""Engines: one small module each, looked up by name with ``get_engine``; heavy imports stay inside."""
from .base import Batch, BatchResult, Engine, engine_names, get_engine, get_engine_class, register_engine

__all__ = ["Batch", "BatchResult", "Engine", "engine_names", "get_engine", "get_engine_class", "register_engine"]
