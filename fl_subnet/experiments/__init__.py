"""The experiment harness: run config, data, partitions, the in-process grid, the
``fl-subnet`` command, results files and plots."""
