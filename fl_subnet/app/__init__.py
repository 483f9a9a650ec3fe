"""The fl-subnet Flower App's entry points (the harness layer): ``server_app:app`` and
``client_app:app``, named in pyproject.toml's ``[tool.flwr.app.components]``."""
