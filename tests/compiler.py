"""Whether this machine can build the compiled CPU kernels (engine/native.py)."""

import os
import shutil

import pytest

HAS_COMPILER = shutil.which(os.environ.get("CXX", "c++")) is not None
needs_kernel = pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler on this machine")


@pytest.fixture
def kernel_convolutions(monkeypatch):
  """The gradient paths' convolutions on the kernel whatever the processor:
  it is used only with AVX or AVX-512 (``native.convolutions_preferred``),
  but it computes the same convolutions with 4-float vectors."""
  from optax_mtl._src.engine import native
  monkeypatch.setattr(native, "convolutions_preferred", native.available)
