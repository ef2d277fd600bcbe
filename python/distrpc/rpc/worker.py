"""``WorkerInfo``: a worker of the group, as torch names it."""

from __future__ import annotations


class WorkerInfo:
    """A worker of the group: its ``id`` (rank) and ``name``."""

    __slots__ = ("id", "name")

    def __init__(self, name: str, id: int) -> None:  # noqa: A002 - torch's name
        self.name = name
        self.id = id

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WorkerInfo) and (self.id, self.name) == (other.id, other.name)

    def __hash__(self) -> int:
        return hash((self.id, self.name))

    def __repr__(self) -> str:
        return f"WorkerInfo(id={self.id}, name={self.name})"

    def __reduce__(self):
        return (WorkerInfo, (self.name, self.id))
