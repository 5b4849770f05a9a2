"""Suite-wide settings: every test uses tiny tensors, where one intra-op thread is faster and
immune to other load on a shared 2-core machine."""

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
