import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
TINY = HERE / "tiny_recipe.yaml"


def selfe(*args, cwd, check=True, env_extra=None, timeout=300):
    """Run the real CLI in a subprocess, as a user would."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    proc = subprocess.run([sys.executable, "-m", "selfe_cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"selfe {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def tiny_recipe():
    return TINY
