"""Shape bucketing: pad lengths to a few sizes so jit compiles a handful of times."""
from __future__ import annotations

# The collators' default smallest bucket: widths are the powers of two 1, 2, 4, 8, ... so a
# row is padded by less than 2x (a 2-token row stays 2 wide, not 16) and lengths up to L
# give at most log2(L) + 1 shapes.
DEFAULT_MIN_BUCKET = 1


def bucket_length(n: int, *, minimum: int = DEFAULT_MIN_BUCKET, maximum: int | None = None) -> int:
    """Smallest power of two >= max(n, minimum), capped at `maximum` (which must be >= n):
    n ≤ width < 2·max(n, minimum)."""
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
