"""mlx's launcher, for the tests that train over two processes: on PATH, or beside this interpreter (a virtual
environment run without activating it)."""

import shutil
import sys
from pathlib import Path

import pytest

MLX_LAUNCH = shutil.which("mlx.launch") or shutil.which("mlx.launch", path=str(Path(sys.executable).parent))
needs_mlx_launch = pytest.mark.skipif(MLX_LAUNCH is None, reason="mlx.launch is not installed")
