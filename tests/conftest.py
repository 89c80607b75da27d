"""Shared test setup: deterministic seeds, the `gpu` marker, and single-threaded-friendly defaults."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    # `gpu` tests run where CUDA exists (benchmarks/gpu_check.sh runs them); elsewhere they are reported as
    # skipped with the reason, never silently dropped. Their CPU twins (TRITON_INTERPRET=1) always run.
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (the TRITON_INTERPRET=1 twin of this test ran on CPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # Every model and tensor in this suite is tiny: a second intra-op thread only adds synchronisation, and on a
    # shared 2-core machine it made a 64x64 linear ~70x slower (27 ms vs 0.4 ms per call) when the other core was
    # busy. Subprocess tests (torchrun, the Triton interpreter) set their own threads.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def lowrank_env(monkeypatch):
    """``lowrank_env(name, value)`` sets (or with None unsets) a LOWRANK_* switch for one test and re-reads the
    settings (``lowrank.dispatch.reload_settings``), as the library reads them once at import; the environment and
    the settings are restored after the test."""
    from lowrank import dispatch

    def set_switch(name: str, value: str | None) -> None:
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
        dispatch.reload_settings()

    yield set_switch
    monkeypatch.undo()
    dispatch.reload_settings()
