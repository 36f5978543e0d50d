"""Failures are data: a trial that produced no objective values is marked FAIL with its reason, and
the study goes on."""

# a trial's failure reason lives in this user attribute; a FAIL without it was cut off and is re-queued
FAILURE = "failure"


class TrialFailed(Exception):
    """A trial that produced no objective values (diverged, over budget, raised): recorded, not fatal."""
