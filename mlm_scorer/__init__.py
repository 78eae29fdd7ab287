"""mlm-scorer: score text with a BERT masked language model.

Public API::

    from mlm_scorer import ScoreSettings, score_file, score_frame
    summary = score_file("input.tsv", "probs.parquet", model="models/bert", mode="whole-word")
    settings = ScoreSettings(model="models/bert", mode="token", on_bad_row="skip")   # every run option, once
    summary = score_file("input.tsv", "probs.parquet", settings)
    words, sentences = score_frame(df, text_column="text", model="models/bert")   # pandas in and out

Imports stay light: TensorFlow and other engine runtimes load only when an engine is created.
"""
from .engines.base import Batch, BatchResult, Engine, engine_names, get_engine, register_engine
from .errors import (EngineError, InputError, Interrupted, MissingDependencyError, MlmScorerError, ModelError,
                     SettingError, StorageError, UnknownEngineError, UsageError)

__version__ = "0.1.0"

__all__ = [
    "score_file", "score_frame", "ScoreSettings", "ScoreSummary", "Scorer", "resolve_model", "ModelDir",
    "Engine", "Batch", "BatchResult", "get_engine", "engine_names", "register_engine",
    "MlmScorerError", "InputError", "UsageError", "ModelError", "EngineError", "UnknownEngineError",
    "MissingDependencyError", "SettingError", "StorageError", "Interrupted", "__version__",
]


def __getattr__(name):  # lazy: keep `import mlm_scorer` and `mlm-score --help` fast
    if name in ("score_file", "ScoreSummary"):
        from . import pipeline

        return getattr(pipeline, name)
    if name == "ScoreSettings":
        from .settings import ScoreSettings

        return ScoreSettings
    if name == "score_frame":
        from .frame import score_frame

        return score_frame
    if name == "Scorer":
        from .scorer import Scorer

        return Scorer
    if name == "resolve_model":
        from .models import resolve_model

        return resolve_model
    if name == "ModelDir":
        from .model_dir import ModelDir

        return ModelDir
    raise AttributeError(f"module 'mlm_scorer' has no attribute {name!r}")
