"""The recent-requests window: counts within its span only, bounded by seconds, not traffic."""

from __future__ import annotations

from clipserve.observability.window import RequestWindow


def test_counts_the_last_minutes_only() -> None:
    now = [1000.0]
    window = RequestWindow(seconds=60, clock=lambda: now[0])
    assert window.recent().error_rate is None
    for status in (200, 200, 503, 404):
        window.record(status)
    recent = window.recent()
    assert (recent.requests, recent.server_errors, recent.error_rate) == (4, 1, 0.25)
    now[0] += 30
    for _ in range(10_000):
        window.record(200)
    assert len(window._buckets) == 2  # one bucket per second, whatever the traffic
    now[0] += 45  # the first second left the window
    recent = window.recent()
    assert (recent.requests, recent.server_errors) == (10_000, 0)
    now[0] += 60
    assert window.recent().requests == 0
