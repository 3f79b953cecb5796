import pytest
import torch

from tests.passes.models import CASES


@pytest.fixture(params=CASES, ids=[c.name for c in CASES])
def case(request):
    torch.manual_seed(0)
    return request.param
