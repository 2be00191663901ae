import os

import torch

# Nothing in the suite may reach for a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")

# Caches the suite writes (the model-file hashes every generated PNG records) go to a folder of
# its own, never the user's ~/.cache; a test that needs a fresh one sets SANA_CACHE_DIR itself.
if "SANA_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["SANA_CACHE_DIR"] = tempfile.mkdtemp(prefix="sana-test-cache-")
    atexit.register(shutil.rmtree, os.environ["SANA_CACHE_DIR"], ignore_errors=True)

# Without a GPU, Triton kernels run in Triton's interpreter. It must be chosen before anything
# (diffusers, through torch) imports triton, so it is set here rather than in the kernel tests.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
