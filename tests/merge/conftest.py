"""The merge tests' fixture: a synthetic base with three parties' branches."""

from __future__ import annotations

import pytest

from tests.support.merging import make_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("merge"))
