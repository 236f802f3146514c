"""Running a daemon command until SIGTERM or SIGINT, as ``kds-cp run`` and ``kds-dp run`` do."""

from __future__ import annotations

import os
import signal
from typing import TYPE_CHECKING, Final

import anyio

if TYPE_CHECKING:
    import logging
    from collections.abc import Awaitable, Callable

__all__ = ["EXIT_FORCED", "run_until_signal"]

EXIT_FORCED: Final = 130
"""Exit status after a second signal: stopping took too long for the operator."""


async def run_until_signal(work: Callable[[], Awaitable[None]], logger: logging.Logger) -> None:
    """Run *work* until it returns, or until SIGTERM/SIGINT cancels it (it then cleans up).

    A second signal while *work* cleans up exits the process at once. An exception
    from *work* is raised as it is (not inside an exception group).
    """
    failure: Exception | None = None
    async with anyio.create_task_group() as group:
        with anyio.CancelScope() as scope:
            group.start_soon(_cancel_on_signal, scope, logger)
            try:
                await work()
            except Exception as exc:
                failure = exc
        group.cancel_scope.cancel()  # the signal watcher
    if failure is not None:
        raise failure


async def _cancel_on_signal(scope: anyio.CancelScope, logger: logging.Logger) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for number in signals:
            if scope.cancel_called:
                logger.warning("%s again: exiting now", signal.Signals(number).name)
                os._exit(EXIT_FORCED)
            logger.info("%s: stopping", signal.Signals(number).name)
            scope.cancel()
