"""create_app: what a server's start-up does to its process."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

from asgi_lifespan import LifespanManager

from clipserve.api.app import create_app
from clipserve.testing import FakeLoader


async def test_a_server_freezes_its_start_up_heap_and_a_library_app_does_not(
    make_settings: Callable[..., Any],
) -> None:
    assert gc.get_freeze_count() == 0
    async with LifespanManager(create_app(make_settings(), loader=FakeLoader())):
        assert gc.get_freeze_count() == 0  # an app inside someone else's process: untouched
    try:
        app = create_app(make_settings(), loader=FakeLoader(), freeze_heap=True)
        async with LifespanManager(app):
            # Modules and the loaded model are out of the collector's sight: a full collection
            # walks only what requests allocate.
            assert gc.get_freeze_count() > 10_000
    finally:
        gc.unfreeze()
