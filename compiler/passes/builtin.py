"""Imports every pass llmc ships, so each registers itself."""

from . import canonicalize, constant_fold, cse, dce  # noqa: F401
from . import fuse_elementwise, recognize_gated_mlp, recognize_rms_norm, recognize_rope, select_logits  # noqa: F401
from . import paged_kv, rope_layout  # noqa: F401
