"""The wire contract of both sides (the Flower layer's lowest part, used by the strategies
and by the ClientApp helpers alike).

- :mod:`.records`: record keys, states ⇄ ArrayRecord, the example input's shape.
- :mod:`.masks`: masks ⇄ ConfigRecord values.
- :mod:`.packed`: a compact slice packed into one array per dtype kind.

The strategy may name its records as it likes (Flower's ``arrayrecord_key`` and
``configrecord_key``); a node reads the one ArrayRecord and the one ConfigRecord of a
train message whatever their names (:func:`read_train`) and replies under the same
ArrayRecord key (docs/design.md, "Wire contract").
"""

from .masks import groups_fingerprint, has_mask, mask_from_config, mask_to_config
from .records import (BASE_FINGERPRINT, BATCHNORM_KEY, EXAMPLE_DTYPE, EXAMPLE_SHAPE, FJORD_WIDTHS, MASK_KEY,
                      METRICS_KEY, SCALE_KEY, SKIP_KEY, UNIT_SCALES_KEY, arrays_to_state, example_from_config,
                      example_to_config, pop_to_arrays, read_train, state_to_arrays, tensor_to_array, widths_from_config,
                      widths_to_config)

__all__ = sorted(["BASE_FINGERPRINT", "BATCHNORM_KEY", "EXAMPLE_DTYPE", "EXAMPLE_SHAPE", "FJORD_WIDTHS", "MASK_KEY",
                  "METRICS_KEY", "SCALE_KEY", "SKIP_KEY", "UNIT_SCALES_KEY", "arrays_to_state", "example_from_config",
                  "example_to_config", "groups_fingerprint", "has_mask", "mask_from_config", "mask_to_config",
                  "pop_to_arrays", "read_train", "state_to_arrays", "tensor_to_array", "widths_from_config", "widths_to_config"])
