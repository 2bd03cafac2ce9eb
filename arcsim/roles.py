"""The two roles of a worker (core layer): one type for the records, the metric labels and the tokens.

Workers ``0 .. num_honest - 1`` are honest and the others Byzantine. The simulator knows this ground
truth, which is what lets it report what a defence did to each role.

>>> role_of(2, num_honest=3), role_of(3, num_honest=3)
(<Role.HONEST: 'honest'>, <Role.BYZANTINE: 'byzantine'>)
>>> Role.HONEST == "honest"  # a str: JSON, Prometheus labels and token texts take it as it is
True
"""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    HONEST = "honest"
    BYZANTINE = "byzantine"


ROLES: tuple[Role, ...] = tuple(Role)


def role_of(worker_id: int, *, num_honest: int) -> Role:
    """The role of ``worker_id`` in a run with ``num_honest`` honest workers."""
    return Role.HONEST if worker_id < num_honest else Role.BYZANTINE
