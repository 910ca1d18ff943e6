import warnings

import pytest
import torch

warnings.filterwarnings("ignore", category=UserWarning, module="timm")


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module of tiny tensors, restored afterwards: on a loaded 2-core
    machine several spinning threads made each small convolution many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
