import pytest
import torch

import fastreg

# Every test that takes `device` runs on the CPU and, when a GPU and fastreg's CUDA kernels are
# present, on CUDA too (skipped cleanly otherwise).
DEVICES = ["cpu", "cuda"]


def cuda_ready() -> bool:
    return torch.cuda.is_available() and fastreg.has_cuda_kernels()


@pytest.fixture(params=DEVICES)
def device(request):
    if request.param == "cuda" and not cuda_ready():
        pytest.skip("no CUDA device or fastreg built without CUDA kernels")
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
