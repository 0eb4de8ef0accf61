"""The statistics tape: CGBN's group statistics recorded once, replayed by recomputation.

Sub-linear memory (``megdet_d2.modeling.sublinear``) reruns forward passes during backward. A
rerun CGBN layer must not issue its collective again (processes recompute different blocks, so
the collectives would mismatch) and must normalise with the first pass's statistics. CGBN's
forward routes its one collective through :func:`forward_collective`; under a tape's
``record()`` the collective runs and its result is stored, under ``replay()`` the stored result
is copied back instead.
"""

import contextlib
import threading

__all__ = ["StatisticsTape", "forward_collective"]

# The StatisticsTape recording or replaying on this thread, if any.
_TAPE = threading.local()


class StatisticsTape:
    """The results of one forward pass's CGBN collectives, in call order.

    ``with tape.record():`` runs every CGBN forward collective and stores its result;
    ``with tape.replay():`` hands the same CGBN calls, in the same order, the stored results.
    """

    def __init__(self):
        self._results = []
        self._next = None  # index of the next result to replay; None = recording

    def _run(self, result, collective):
        """Run ``collective`` (which fills ``result``) and record, or replay into ``result``."""
        if self._next is None:
            collective()
            self._results.append(result.clone())
            return
        if self._next >= len(self._results):
            raise RuntimeError("CGBN: recomputation made more CGBN calls than the recorded pass")
        result.copy_(self._results[self._next])
        self._next += 1

    @contextlib.contextmanager
    def _active(self, next_index):
        previous = getattr(_TAPE, "tape", None)
        _TAPE.tape, self._next = self, next_index
        try:
            yield self
        finally:
            _TAPE.tape = previous

    def record(self):
        """Context: run and store this thread's CGBN forward collectives."""
        return self._active(None)

    def replay(self):
        """Context: replay the stored results, from the first, instead of communicating."""
        return self._active(0)


def forward_collective(result, collective):
    """Run a CGBN forward's one collective (``collective()`` fills ``result``), or let the
    active tape record / replay it."""
    tape = getattr(_TAPE, "tape", None)
    if tape is None:
        collective()
    else:
        tape._run(result, collective)
