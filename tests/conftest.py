import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import pytest
import torch


@pytest.fixture
def one_thread():
    """One torch thread for the test: deterministic and immune to a busy machine (use with ``pytestmark``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
