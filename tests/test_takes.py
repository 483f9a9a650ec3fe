"""Which keywords a user's train function takes is read once per function (every train
message asks), and still read for a callable that cannot be hashed."""

from fl_subnet.clients.app import _takes, _takes_cached


def test_a_function_is_read_once():
    def train(model, data, cfg, *, device=None):
        return 0, 0.0

    before = _takes_cached.cache_info()
    assert _takes(train, "device") and not _takes(train, "before_step")
    assert _takes(train, "device") and not _takes(train, "before_step")
    after = _takes_cached.cache_info()
    assert after.misses - before.misses == 2 and after.hits - before.hits == 2


def test_an_unhashable_callable_is_read_each_time():
    class Train:
        __hash__ = None

        def __eq__(self, other):
            return self is other

        def __call__(self, model, data, cfg, **kwargs):
            return 0, 0.0

    assert _takes(Train(), "device") and _takes(Train(), "before_step")
