import functools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def _nan_filled(allocate):
    """``allocate`` (torch.empty, torch.empty_like, Tensor.new_empty) whose floating-point results
    start as NaN, so a kernel that reads memory it never wrote fails a test instead of passing by luck."""

    @functools.wraps(allocate)
    def wrapper(*args, **kwargs):
        t = allocate(*args, **kwargs)
        # FX proxies and other tensor-likes pass through; the fill itself is not part of any graph
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()):
            with torch.no_grad():
                t.fill_(float("nan"))
        return t

    return wrapper


# `with torch.device(...)` finds the factory functions to redirect through a set of torch functions it
# builds once, on first use. Build it now, from the real ones: built while torch.empty is wrapped, it
# would hold the wrapper, and models made under `torch.device("meta")` would come out on the CPU.
with torch.device("meta"):
    torch.empty(0)


@pytest.fixture(autouse=True)
def _uninitialised_memory_is_nan(monkeypatch):
    monkeypatch.setattr(torch, "empty", _nan_filled(torch.empty))
    monkeypatch.setattr(torch, "empty_like", _nan_filled(torch.empty_like))
    monkeypatch.setattr(torch.Tensor, "new_empty", _nan_filled(torch.Tensor.new_empty))
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
