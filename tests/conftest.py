import pytest
import torch

# The test models are tiny: one intra-op thread is as fast as two and does not collapse when another
# process shares the CPU cores (oversubscribed OpenMP threads made steps up to 30x slower here).
torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow (make test-all)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Tests never read or write the user's ~/.cache/fewstep: one shared temporary cache per session."""
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path_factory.getbasetemp() / "fewstep-cache"))
