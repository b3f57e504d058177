import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models and matrices (``pytestmark = pytest.mark.usefixtures("one_thread")``): one
    thread is faster than several there, and than two on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
