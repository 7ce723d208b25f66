"""Data: batch types, collation, dataset adapters and the embedded tasks.

`datasets` is imported inside the adapters only, so the model, sampler and
benchmarks run where it is not installed.
"""
from rljax.data.batch import SequenceBatch
from rljax.data.collate import BatchIterator, collate_prompt_completion

__all__ = ["BatchIterator", "SequenceBatch", "collate_prompt_completion"]
