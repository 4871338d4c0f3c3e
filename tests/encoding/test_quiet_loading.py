"""Issue 22, finding 6: a library call that loads the model prints nothing (no "Loading weights" bar),
inside an application as in a worker; the bar is transformers' own, so the test clears every setting that
would hide it anyway."""

from __future__ import annotations

import os
import subprocess
import sys

CODE = """
import pgsim
vector = pgsim.Encoder(backend="torch").encode(["a web application's first query"])[0]
print(vector.shape)
from transformers.utils import logging
print(logging.is_progress_bar_enabled())
"""


def test_loading_the_model_prints_nothing_and_leaves_transformers_settings_as_they_were() -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_HUB_DISABLE", "TRANSFORMERS_"))}
    env.update(HF_HUB_OFFLINE="1", PGSIM_BACKEND="torch")
    done = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["(384,)", "True"]
    assert "Loading weights" not in done.stderr and "it/s" not in done.stderr, done.stderr
