"""A pytest plugin (``-p tests.registry_plugin``) that registers a method only the tests know, before
collection, so that the registry's contract tests pick it up with no test written for it
(``tests/test_registry_contract.py::test_a_newly_registered_method_is_collected_and_passes``)."""

from __future__ import annotations

from nexttools.methods import METHODS
from nexttools.methods.last_interval import LastInterval


class RepeatedInterval(LastInterval):
    """last-interval under another name: a well-behaved newcomer."""

    name = "repeated-interval"
    summary = "the last k-checkpoint change repeated (a test-only registration)"


METHODS.setdefault(RepeatedInterval.name, RepeatedInterval())
