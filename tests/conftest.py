"""Test-wide settings: one torch thread (tiny tensors on 2 shared cores are much slower with
two threads, see README "Threads") and deterministic seeds."""
import torch

torch.set_num_threads(1)
torch.manual_seed(0)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tansu():
    """The embedded Kafka broker's executable; the tests that need one skip, saying why, without it."""
    from amstream.connectors.broker import find_tansu
    from amstream.exceptions import AmstreamError

    try:
        return find_tansu()
    except AmstreamError as exc:
        pytest.skip(str(exc))
