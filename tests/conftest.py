import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _isolated_cache(monkeypatch, tmp_path_factory):
    """Keep converted models in the user's cache (it is expensive to rebuild) but never write outputs elsewhere."""
    yield
