"""Seeds derived from a key of integers, e.g. (``cfg.SEED``, rank, purpose, iteration).

Resuming exactly needs every random stream to be a function of where the run is, not of how
it got there: each stream is seeded from its own key, so a resumed run recomputes the seed of
iteration ``i`` (or of the ``p``-th image a process reads) without replaying the draws before.
"""

import numpy as np

__all__ = ["derived_seed"]


def derived_seed(*key):
    """A well-mixed 31-bit seed for a key of non-negative integers (NumPy's ``SeedSequence``)."""
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1)[0] >> 1)
