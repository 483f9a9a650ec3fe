"""fl-subnet's Apps show their INFO lines through Flower's console handler."""

import logging

from fl_subnet.logs import use_flower_console


def test_app_logs_go_to_flowers_console_unless_logging_is_configured():
    ours, root = logging.getLogger("fl_subnet"), logging.getLogger()
    saved = (ours.handlers[:], ours.level, root.handlers[:])
    try:
        ours.handlers[:] = []
        root.handlers[:] = []
        use_flower_console()
        assert ours.handlers == logging.getLogger("flwr").handlers and ours.handlers
        assert logging.getLogger("fl_subnet.strategies.base").isEnabledFor(logging.INFO)
        ours.handlers[:] = []
        root.handlers[:] = [logging.NullHandler()]  # the application configured logging itself
        use_flower_console()
        assert ours.handlers == []
    finally:
        ours.handlers[:], root.handlers[:] = saved[0], saved[2]
        ours.setLevel(saved[1])
