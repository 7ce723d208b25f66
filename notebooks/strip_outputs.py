"""Remove outputs and execution counts from notebooks, in place, before committing them.

    python notebooks/strip_outputs.py notebooks/*.ipynb

Cell sources, cell ids and notebook metadata are kept; a notebook already stripped is not
rewritten. (`jupyter nbconvert --clear-output --inplace notebooks/*.ipynb` does the same
where nbconvert is installed.)
"""
from __future__ import annotations

import sys

import nbformat


def strip(path: str) -> bool:
    """Strip one notebook; True when it changed."""
    nb = nbformat.read(path, as_version=4)
    changed = False
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        if cell.get("outputs") or cell.get("execution_count") is not None:
            cell.outputs, cell.execution_count, changed = [], None, True
        if "execution" in cell.metadata:  # per-cell timings some front ends record
            del cell.metadata["execution"]
            changed = True
    if changed:
        nbformat.write(nb, path)
    return changed


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for p in sys.argv[1:]:
        print(f"{'stripped' if strip(p) else 'clean   '} {p}")
