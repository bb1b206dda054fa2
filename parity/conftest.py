import pytest

from hf_reference import TWINS


@pytest.fixture(params=sorted(TWINS))
def backend(request):
    """Each parity test runs once per twin."""
    return request.param
