"""fl_subnet.clients (lives in the top-level `clients/` folder)."""

if __name__ == "clients":  # imported as a top-level package by accident
    raise ImportError("import this package as 'fl_subnet.clients', not 'clients'")
