"""The pure-torch core: unit groups, masks, samplers, gather/scatter, masked
aggregation and compact modules. Imports nothing from Flower or the harness."""
