"""Thread control for loops of small tensor ops."""
import contextlib
from typing import Iterator

import torch

__all__ = ['single_thread']


@contextlib.contextmanager
def single_thread(enabled: bool = True) -> Iterator[None]:
    """Run torch on one thread inside the block. For thousands of small ops, per-op thread hand-offs cost more
    than they save - several-fold on a loaded 2-core machine, where a second thread is often descheduled."""
    threads = torch.get_num_threads()
    if enabled:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
