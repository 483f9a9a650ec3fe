"""The exceptions users catch live in fl_subnet.exceptions, are exported from fl_subnet,
and are the very classes the modules that raise them use."""

import ast
from pathlib import Path

import fl_subnet
from fl_subnet import exceptions
from fl_subnet.core.analysis import resolve
from fl_subnet.experiments import experiment
from fl_subnet.strategies import base, nodes, replies


def test_one_class_each_everywhere():
    raisers = {"AnalysisError": resolve, "NotEnoughNodes": nodes, "ReplyError": replies,
               "RunFailed": experiment, "TrainingStalled": base}
    assert sorted(raisers) == exceptions.__all__
    for name, module in raisers.items():
        cls = getattr(exceptions, name)
        assert getattr(module, name) is cls and getattr(fl_subnet, name) is cls, name
        assert name in fl_subnet.__all__


def test_the_module_imports_nothing():
    """Every layer may import it (the pure-torch core included)."""
    tree = ast.parse(Path(exceptions.__file__).read_text())
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert [i.module for i in imports if isinstance(i, ast.ImportFrom)] == ["__future__"]
    assert not [i for i in imports if isinstance(i, ast.Import)]


def test_catchable_as_the_builtin_they_refine():
    assert issubclass(exceptions.AnalysisError, NotImplementedError)
    assert issubclass(exceptions.ReplyError, ValueError)
    assert all(issubclass(getattr(exceptions, n), RuntimeError) for n in ("NotEnoughNodes", "RunFailed",
                                                                             "TrainingStalled"))
