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


@pytest.fixture
def bars(monkeypatch: pytest.MonkeyPatch):
    """``bars("decathlete.evaluate", ...)`` swaps those modules' ``tqdm`` for one that draws every update (so a bar's
    final ``n/total`` reaches stderr even when it is not kept) and returns the list every bar made is added to
    (read ``n``, ``total``, ``disable``; ``desc`` and ``unit`` exist only on enabled bars)."""
    from tqdm.auto import tqdm

    made: list = []

    class Drawn(tqdm):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **{**kwargs, "mininterval": 0, "miniters": 1})
            made.append(self)

    def patch(*modules: str) -> list:
        for module in modules:
            monkeypatch.setattr(f"{module}.tqdm", Drawn)
        return made

    return patch
