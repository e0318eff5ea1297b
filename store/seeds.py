"""Seeds derived from a run's seed, so every random draw is a pure function of where it happens.

The data order of an epoch, the crop of a sample, the dropout stream of a torchrun rank: each
gets its own generator seeded by (seed, epoch[, sample]) or (seed, rank). Resuming then needs only
the position, never a generator's state, and a sample's crop does not depend on which worker
decodes it. Distinct large primes keep the streams from colliding for realistic sizes.
"""

from __future__ import annotations

_PRIMES = (1_000_003, 10_000_019, 100_000_007)


def derive_seed(seed: int, *parts: int) -> int:
    """derive_seed(s, a) = s*1000003 + a; derive_seed(s, a, b) = (s*1000003 + a)*10000019 + b."""
    if len(parts) > len(_PRIMES):
        raise ValueError(f"at most {len(_PRIMES)} parts, got {len(parts)}")
    for prime, part in zip(_PRIMES, parts, strict=False):
        seed = seed * prime + part
    return seed
