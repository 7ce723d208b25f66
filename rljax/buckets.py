"""Shape bucketing: pad lengths to a few sizes so jit compiles a handful of times."""
from __future__ import annotations

# The collators' default smallest bucket: widths are the powers of two 1, 2, 4, 8, ... so a
# row is padded by less than 2x (a 2-token row stays 2 wide, not 16) and lengths up to L
# give at most log2(L) + 1 shapes.
DEFAULT_MIN_BUCKET = 1
# Above FINE_FROM the widths step by 1/STEPS_PER_OCTAVE of an octave (64, 80, 96, 112, 128,
# 160, 192, ...): there a padded token costs more than the extra compiles (a 97-token batch
# padded to 128 trained 1.5x slower than at 112 or 97 on 2 CPU cores), so padding stays
# under 25% at STEPS_PER_OCTAVE shapes per octave; below it the powers of two keep the
# number of compiles down where the padded tokens are cheap.
FINE_FROM = 64
STEPS_PER_OCTAVE = 4


def bucket_length(n: int, *, minimum: int = DEFAULT_MIN_BUCKET, maximum: int | None = None) -> int:
    """The bucketed width of an n-long row: the smallest power of two >= max(n, minimum) up
    to FINE_FROM, above it the smallest multiple of 2^k / STEPS_PER_OCTAVE >= n in the octave
    (2^k, 2^(k+1)] holding n; never below `minimum`, capped at `maximum` (which must be >= n).
    n ≤ width < 2·max(n, minimum), and width < 1.25·n once n > FINE_FROM."""
    if n < 0:
        raise ValueError(f"bucket_length: length must be >= 0, got {n}")
    b = max(int(minimum), 1)
    while b < n:
        b *= 2
    half = b // 2
    if half >= FINE_FROM and n > half:  # n fixed this octave (not minimum): round up within it
        step = half // STEPS_PER_OCTAVE
        b = max(half + step * -(-(n - half) // step), int(minimum))
    if maximum is not None:
        if n > maximum:
            raise ValueError(f"bucket_length: length {n} exceeds the maximum {maximum}")
        b = min(b, maximum)
    return b
