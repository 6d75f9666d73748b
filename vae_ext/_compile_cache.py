"""The build's identity in torch.compile's cache key.

Inductor's FX graph and AOTAutograd caches key a graph on its code, its inputs and torch's own
configuration, not on what a custom op does: a graph compiled against one build of vae_ext, whose
op returned a float32 buffer, is reused after a rebuild whose op returns a float64 one, and runs
kernels generated for the old dtypes (a wrong gradient, no error; seen after such a rebuild). The
one key torch lets a library extend is ``torch.compiler.config.cache_key_tag``; importing vae_ext
appends the build's identity to it, so a rebuilt or upgraded vae_ext compiles afresh once. The
identity is the compiled extension's size and modification time and the fake kernels' source
(vae_ext/_ops.py, which an editable install changes without a rebuild): a stat and one small read.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

_PREFIX = "vae_ext-"


def build_identity(library: str | os.PathLike, fakes: str | os.PathLike) -> str:
    """A short hash of the compiled library's size and mtime and of the fake kernels' source."""
    st = os.stat(library)
    h = hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}:".encode())
    h.update(Path(fakes).read_bytes())
    return h.hexdigest()[:16]


def tag_compile_cache(library: str | os.PathLike, fakes: str | os.PathLike) -> str:
    """Put this build's identity into ``torch.compiler.config.cache_key_tag`` (replacing an earlier
    vae_ext identity, keeping whatever else the user's tag holds); returns the new tag."""
    cfg = torch.compiler.config
    mine = _PREFIX + build_identity(library, fakes)
    parts = [p for p in cfg.cache_key_tag.split(",") if p and not p.startswith(_PREFIX)]
    cfg.cache_key_tag = ",".join([*parts, mine])
    return cfg.cache_key_tag
