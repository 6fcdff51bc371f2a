"""How long to wait before re-sending a request: the reward plane's client and the external reward
servers retry the same way."""

from __future__ import annotations

import random

MAX_BACKOFF_S = 30.0  # a restarting replica or server is polled at least this often


def backoff_s(base_s: float, attempt: int) -> float:
    """The wait after failed attempt ``attempt`` (1 for the first): base_s · 2^(attempt − 1), at most
    MAX_BACKOFF_S, times a random factor in [0.5, 1] (jitter: clients that failed together do not all
    come back in step)."""
    return random.uniform(0.5, 1.0) * min(MAX_BACKOFF_S, base_s * 2 ** (attempt - 1))
