"""A rebuilt vae_ext is never served a graph that Inductor cached against another build
(vae_ext/_compile_cache.py): the build's identity is part of torch.compile's cache key."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

import vae_ext
from vae_ext import _C, _ops
from vae_ext._compile_cache import build_identity, tag_compile_cache


@pytest.fixture
def restore_tag():
    saved = torch.compiler.config.cache_key_tag
    yield
    torch.compiler.config.cache_key_tag = saved


def test_import_tags_the_cache_key_with_this_build():
    assert vae_ext is not None
    want = "vae_ext-" + build_identity(_C.__file__, _ops.__file__)
    assert want in torch.compiler.config.cache_key_tag.split(",")


def test_identity_changes_with_the_library_and_the_fake_kernels(tmp_path):
    lib, fakes = tmp_path / "_C.so", tmp_path / "_ops.py"
    shutil.copyfile(_C.__file__, lib)
    shutil.copyfile(_ops.__file__, fakes)
    first = build_identity(lib, fakes)
    assert build_identity(lib, fakes) == first
    st = os.stat(lib)
    os.utime(lib, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a rebuild, same size
    rebuilt = build_identity(lib, fakes)
    assert rebuilt != first
    fakes.write_text(fakes.read_text() + "\n# an edited fake kernel\n")  # an editable install's edit
    assert build_identity(lib, fakes) not in (first, rebuilt)


def test_a_users_tag_is_kept_and_an_old_identity_replaced(restore_tag, tmp_path):
    torch.compiler.config.cache_key_tag = "my-run,vae_ext-0123456789abcdef"
    tag = tag_compile_cache(_C.__file__, _ops.__file__)
    assert tag == "my-run,vae_ext-" + build_identity(_C.__file__, _ops.__file__)
