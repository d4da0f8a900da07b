import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the independent PIL renderer


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


REPO = Path(__file__).resolve().parents[1]
