"""SplitMix64 seed mixing shared by the mask collators and the resumable sampler."""

from __future__ import annotations

__all__ = ["mix", "splitmix64"]

MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """One SplitMix64 step: a bijective, well-mixed map of 64-bit ints."""
    z = (x + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def mix(*parts: int) -> int:
    """A 64-bit seed from integers: a SplitMix64 chain over ``parts`` (order matters)."""
    h = 0
    for p in parts:
        h = splitmix64(h ^ (int(p) & MASK64))
    return h
