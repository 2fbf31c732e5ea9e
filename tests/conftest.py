import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy machine the threads' spinning
    multiplies the run time; one thread keeps such modules fast everywhere."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


_CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                         reason="needs a CUDA device")])


@pytest.fixture(params=["cpu", _CUDA])
def device(request):
    """A test that takes ``device`` runs on the CPU, and again on CUDA where a GPU is present
    (marked ``gpu``: ``pytest -m gpu`` runs only those)."""
    return torch.device(request.param)
