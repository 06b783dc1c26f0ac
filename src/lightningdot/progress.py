"""How long-running library calls report progress, so a command line can draw a bar."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def start(self, total: int, label: str) -> None:
        """Work of `total` items called `label` begins (a second call starts another)."""

    def advance(self, n: int) -> None:
        """`n` more items are done."""


class Silent:
    """Progress that nobody watches."""

    def start(self, total: int, label: str) -> None:
        pass

    def advance(self, n: int) -> None:
        pass
