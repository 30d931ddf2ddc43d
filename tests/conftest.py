import os
from pathlib import Path

import pytest

# Tests never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models run fastest on one thread; more only contend on a 2-core machine."""
    import torch

    torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu",
                     help="torch device for the tests that take the `device` fixture: the masking core and the hf "
                          "generation backend (e.g. cuda on a GPU machine; the rest always run on CPU)")


def pytest_configure(config):
    import torch

    name = config.getoption("--device")
    try:
        chosen = torch.device(name)
    except RuntimeError as exc:
        raise pytest.UsageError(f"--device {name}: {exc}") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"--device {name}: torch sees no CUDA device")


@pytest.fixture(scope="session")
def device(request):
    """The ``--device`` the device-aware tests build their models and tensors on (default cpu)."""
    import torch

    return torch.device(request.config.getoption("--device"))


ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """The offline GSM8K/IFEval copies beside the checkout; tests needing them skip when absent."""
    if not (SHARED_DATA / "gsm8k" / "test.jsonl").is_file():
        pytest.skip("offline data directory ../shared/data not present")
    return SHARED_DATA
