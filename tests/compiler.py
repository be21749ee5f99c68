"""Whether this machine can build the compiled CPU kernels (engine/native.py)."""

import os
import shutil

import pytest

HAS_COMPILER = shutil.which(os.environ.get("CXX", "c++")) is not None
needs_kernel = pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler on this machine")
