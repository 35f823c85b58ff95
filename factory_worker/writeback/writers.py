"""The writer of the configured source: GitHub or Linear (the settings refuse write-back for any other)."""

from __future__ import annotations

from factory_worker.config.settings import SourceSettings, TrackerSettings
from factory_worker.writeback.github import GitHubWriter
from factory_worker.writeback.linear import LinearWriter


def writer_for(source: SourceSettings, tracker: TrackerSettings) -> GitHubWriter | LinearWriter:
    if source.kind == "linear":
        return LinearWriter(source, tracker)
    return GitHubWriter(source, tracker)
