"""Find unit groups by tracing a model (torch.fx) with per-layer rules."""


def find_unit_groups(model, example_input=None):
    """The unit groups masked by default (``analyze(model, example_input).groups``),
    without the verification; see :func:`fl_subnet.analyze`."""
    from ..spec import analyze

    return analyze(model, example_input, verify=False).groups
