"""Shape bucketing: pad lengths to a few sizes so jit compiles a handful of times."""
from __future__ import annotations


def bucket_length(n: int, *, minimum: int = 16, maximum: int | None = None) -> int:
    """Smallest power of two >= max(n, minimum), capped at `maximum` (which must be >= n)."""
    if n < 0:
        raise ValueError(f"bucket_length: length must be >= 0, got {n}")
    b = max(int(minimum), 1)
    while b < n:
        b *= 2
    if maximum is not None:
        if n > maximum:
            raise ValueError(f"bucket_length: length {n} exceeds the maximum {maximum}")
        b = min(b, maximum)
    return b
