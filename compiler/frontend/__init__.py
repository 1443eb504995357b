"""Frontends: Hugging Face models (via torch.export) → llmc IR."""

from .aten_import import ImportError_ as FrontendImportError
from .aten_import import UnsupportedOpError, import_program
from . import recurrent as _recurrent  # noqa: F401  (import rules of the state ops)
from .hf import ImportedModel, ModelSourceError, import_hf_model, import_model, resolve_source

__all__ = ["FrontendImportError", "ImportedModel", "ModelSourceError", "UnsupportedOpError",
           "import_hf_model", "import_model", "import_program", "resolve_source"]
