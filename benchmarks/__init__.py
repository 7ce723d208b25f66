"""Benchmarks: `python -m benchmarks.<name> [--field value ...]`, figures with their configuration.

`python -m benchmarks.<name>` first re-executes itself with glibc's huge pages on for XLA's large
buffers (`rljax.host_memory.exec_with_huge_pages`: 5-18% faster CPU train steps; RLJAX_HUGE_PAGES=0
turns it off). Importing the package does nothing.
"""
import sys

if sys.argv[:1] == ["-m"]:  # `python -m benchmarks.<name>` while the package is imported: before jax is
    from rljax.host_memory import exec_with_huge_pages

    exec_with_huge_pages()
