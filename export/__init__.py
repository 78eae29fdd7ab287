"""mlm_export: turn a masked-LM checkpoint (BERT and the families of ``families.py``) into a
self-describing TensorFlow SavedModel (and ONNX).

Installed as the package ``mlm_export`` (from the repository's ``export/`` directory).
``export(source, out_dir)`` is the Python entry point; ``mlm-export`` is its command line.
"""
from .checkpoint import Checkpoint, CheckpointError, load_checkpoint
from .errors import CasingError

__all__ = ["export", "load_checkpoint", "Checkpoint", "CheckpointError", "CasingError"]


def export(*args, **kwargs):
    """See ``mlm_export.saved_model.export`` (imported lazily: it needs TensorFlow)."""
    from .saved_model import export as _export

    return _export(*args, **kwargs)
