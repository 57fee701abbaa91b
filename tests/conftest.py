import os

import torch

# Nothing in the test suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# The suite's models are small: one intra-op thread is as fast as two on an idle 2-core
# machine and 10-30x faster when anything else runs (OpenMP threads spin-wait for a
# descheduled peer on every small op).
torch.set_num_threads(1)
