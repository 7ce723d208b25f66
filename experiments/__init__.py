"""Experiment modules: `python -m experiments.<name> [--field value ...]` (`rljax.cli.run`).

`python -m experiments.<name>` first calls `rljax.host_memory.setup_host_memory`, which reads
RLJAX_KEEP_BUFFERS and RLJAX_HUGE_PAGES (both opt-in; what they do and cost: that module's
docstring). Importing the package does nothing.
"""
import sys

if sys.argv[:1] == ["-m"]:  # `python -m experiments.<name>` while the package is imported: before jax is
    from rljax.host_memory import setup_host_memory

    setup_host_memory()
