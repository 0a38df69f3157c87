"""Lines the capture tests report at the end of the session (the architecture zoo's counts, the diffs)."""

from __future__ import annotations

SUMMARY: list[str] = []


def pytest_terminal_summary(terminalreporter):  # type: ignore[no-untyped-def]
    if SUMMARY:
        terminalreporter.section("topomon architectures")
        for line in SUMMARY:
            terminalreporter.write_line(line)
