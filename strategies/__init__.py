"""fl_subnet.strategies (lives in the top-level `strategies/` folder)."""

if __name__ == "strategies":  # imported as a top-level package by accident
    raise ImportError("import this package as 'fl_subnet.strategies', not 'strategies'")
