"""Shared test settings.

Tests run small tensors; one torch thread per process avoids the two cores fighting over
intra-op parallelism while Ray workers and replicas run beside the test process.
"""

import os

import torch

torch.set_num_threads(1)
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
