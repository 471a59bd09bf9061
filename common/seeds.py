"""The seeds policy every arm follows: one function of (run seed, round, arm), the same in a
resumed run as in an uninterrupted one. Its own module, free of torch, because the ServerApp
(which never imports torch) and the sites both use it."""

from __future__ import annotations

# Seed mixing: distinct, fixed strides for the run seed and the round (primes, so runs,
# rounds and arms do not collide for any realistic count), reduced to a torch seed.
SEED_STRIDE, ROUND_STRIDE, SEED_SPACE = 1_000_003, 1009, 2**31


def arm_seed(seed: int, rnd: int, arm: str) -> int:
    """The training-order seed of one arm in one round: the seeds policy every arm follows
    (the centralised reference too), the same in a resumed run as in an uninterrupted one."""
    return (seed * SEED_STRIDE + rnd * ROUND_STRIDE + sum(map(ord, arm))) % SEED_SPACE
