"""pytest configuration shared by the test files."""

import os

import pytest


def pytest_configure(config):
    """Under pytest-xdist (pytest.ini: `-n auto`, one worker per core up to 4) each worker gets its share of the
    cores, in this process and in the subprocesses it starts: the tiny models scale poorly past one thread, and two
    workers running two threads each on 2 cores would oversubscribe them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers:
        import torch
        threads = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))


@pytest.fixture(scope="session")
def shapes_base():
    """Path of the shipped CLIP base model (models/shapes-tiny-vit-shapes-base.pt, hash-checked)."""
    import common
    return common.shapes_base_path(common.TINY_MODEL)


@pytest.fixture(scope="session")
def shapes_siglip_base():
    """Path of the shipped SigLIP base model (models/shapes-tiny-siglip-shapes-base.pt, hash-checked)."""
    import common
    return common.shapes_base_path(common.SHAPES_SIGLIP_MODEL)


# The files whose tests take longest (their learning fixtures train for minutes), slowest first. pytest.ini hands
# whole files to the workers (--dist loadfile) in collection order, so starting with these lets the short files
# fill in around them and the workers finish together instead of one of them starting a long file last.
SLOWEST_FILES = ("test_degla.py", "test_goal.py", "test_lab.py", "test_end_to_end.py", "test_accumulation.py",
                 "test_siglip_ddp.py", "test_common.py", "test_cehn.py", "test_c2lip.py", "test_shards.py")


def pytest_collection_modifyitems(session, config, items):
    def rank(item):
        name = os.path.basename(str(item.fspath))
        return SLOWEST_FILES.index(name) if name in SLOWEST_FILES else len(SLOWEST_FILES)
    items[:] = sorted(items, key=rank)   # stable: the order inside a file is kept
