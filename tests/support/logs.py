"""Capturing what the proxies log (twisted.logger events), for assertions."""

from __future__ import annotations

from twisted.logger import LogEvent, formatEvent, globalLogPublisher


class LogCapture:
    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        self.events.append(event)

    def texts(self) -> list[str]:
        return [formatEvent(e) for e in self.events]

    def matching(self, needle: str) -> list[str]:
        return [t for t in self.texts() if needle in t]

    def ends(self) -> list[LogEvent]:
        """Per-connection end events."""
        return [e for e in self.events if "how" in e and "conn_id" in e and "up" in e]

    def start(self) -> LogCapture:
        globalLogPublisher.addObserver(self)
        return self

    def stop(self) -> None:
        globalLogPublisher.removeObserver(self)
