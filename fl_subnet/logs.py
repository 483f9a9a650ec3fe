"""fl-subnet's log lines in Flower's console output, for fl-subnet's own Apps.

Library modules only create loggers (``logging.getLogger(__name__)``, all under
``fl_subnet``); without a handler Python shows warnings only. The ServerApp and ClientApp
of this project call :func:`use_flower_console` so that their INFO lines (round summaries,
bytes, the file a model was saved to) appear in ``flwr run --stream`` and in the
SuperNodes' logs next to Flower's own.
"""

from __future__ import annotations

import logging


def use_flower_console(level: int = logging.INFO) -> None:
    """Send ``fl_subnet`` log records at ``level`` and above to Flower's console handler.

    Does nothing if the ``fl_subnet`` logger or the root logger already has a handler
    (an application that configured logging itself keeps its own setup), or if Flower's
    logger has none.
    """
    import flwr.common.logger  # noqa: F401  (creates Flower's console handler)

    ours = logging.getLogger("fl_subnet")
    if ours.handlers or logging.getLogger().handlers:
        return
    flower = logging.getLogger("flwr").handlers
    for handler in flower:
        ours.addHandler(handler)
    if flower:
        ours.setLevel(level)
