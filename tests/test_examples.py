"""Every script in ``examples/`` runs to the end (they are what users copy from).

Examples that take minutes on two CPU cores are marked ``slow`` and left out of the default run (``-m "not slow"``
in pyproject.toml); run them with ``python -m pytest -m slow tests/test_examples.py``.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))
SLOW = {"real_weights"}  # real pretrained EfficientNet-Lites fine-tuned and cloned: minutes on two CPU cores


@pytest.mark.parametrize(
    "script",
    [pytest.param(p, marks=pytest.mark.slow) if p.stem in SLOW else p for p in EXAMPLES],
    ids=[p.stem for p in EXAMPLES],
)
def test_example_runs(script: Path, tmp_path: Path) -> None:
    single_threaded = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
    }  # as the suite (conftest.py): no thread spinning under load
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=single_threaded, capture_output=True, text=True, timeout=1800
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip(), "an example says what it did"
