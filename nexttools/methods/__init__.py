"""The extrapolation methods: one module each, registered here once (see ``docs/extending.md``)."""

from __future__ import annotations

from nexttools.errors import UserError
from nexttools.methods.base import Jump, JumpRequest, Method, target_step
from nexttools.methods.factor_linear import FactorLinear
from nexttools.methods.last_interval import LastInterval
from nexttools.methods.linear_rank1 import LinearRank1
from nexttools.methods.next import NExt
from nexttools.methods.relex import Relex
from nexttools.methods.rl_extra import RLExtra

METHODS: dict[str, Method] = {
    method.name: method
    for method in (NExt(), LastInterval(), RLExtra(), LinearRank1(), FactorLinear(), Relex())
}
"""Every ``--method``, in the order the CLI, the back-test and the docs list them."""


def get_method(name: str) -> Method:
    """The registered method called ``name``; ``UserError`` listing the choices otherwise."""
    if name not in METHODS:
        raise UserError(f"unknown --method {name!r} (choose from {', '.join(METHODS)})")
    return METHODS[name]


__all__ = ["METHODS", "Jump", "JumpRequest", "Method", "get_method", "target_step"]
