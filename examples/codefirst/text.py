"""Plain helpers the tasks import: any module of the package is in the image."""

from __future__ import annotations


def words(text: str) -> list[str]:
    return [w.strip(".,;:!?").lower() for w in text.split() if w.strip(".,;:!?")]
