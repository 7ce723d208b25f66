"""Experiment modules: `python -m experiments.<name> [--field value ...]` (`rljax.cli.run`).

`python -m experiments.<name>` first re-executes itself with glibc's huge pages on for XLA's large
buffers (`rljax.host_memory.setup_host_memory`: 5-18% faster CPU train steps; RLJAX_HUGE_PAGES=0
turns it off), and with RLJAX_KEEP_BUFFERS=1 keeps those buffers in the heap from one step to the
next (faster again where they are large, more peak memory where they are not). Importing the package
does nothing.
"""
import sys

if sys.argv[:1] == ["-m"]:  # `python -m experiments.<name>` while the package is imported: before jax is
    from rljax.host_memory import setup_host_memory

    setup_host_memory()
