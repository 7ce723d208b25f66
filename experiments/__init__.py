"""Experiment modules: `python -m experiments.<name> [--field value ...]` (`rljax.cli.run`).

`python -m experiments.<name>` first sets up host memory as the environment asks
(`rljax.host_memory.setup_host_memory`): RLJAX_KEEP_BUFFERS=1 keeps XLA's large per-step buffers in
the heap from one step to the next (faster where they are large, more peak memory where they are
not; set while the process runs), RLJAX_HUGE_PAGES=1 backs them with transparent huge pages
(faster steps on some hosts, slower first steps on others; glibc's tunable, so the process
re-executes itself). Without either it runs as it is. Importing the package
does nothing.
"""
import sys

if sys.argv[:1] == ["-m"]:  # `python -m experiments.<name>` while the package is imported: before jax is
    from rljax.host_memory import setup_host_memory

    setup_host_memory()
