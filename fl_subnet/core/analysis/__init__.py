"""Find unit groups by tracing a model (torch.fx) with per-layer rules."""
