"""The cloud's health report as Prometheus metrics (served by fieldlink.metrics)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fieldlink.metrics import Family, counter, gauge

__all__ = ["cloud_metrics"]


def cloud_metrics(h: dict[str, Any]) -> Iterator[Family]:
    yield gauge(
        "fieldlink_cloud_broker_connected", "1 while connected to the broker", int(h.get("broker") == "connected")
    )
    yield counter("fieldlink_cloud_messages", "MQTT messages received", h.get("messages"))
    yield counter("fieldlink_cloud_records", "Records decoded", h.get("records"))
    yield counter("fieldlink_cloud_records_stored", "Records written to the store", h.get("records_stored"))
    yield counter("fieldlink_cloud_records_rejected", "Records the store refused for good", h.get("records_rejected"))
    yield counter(
        "fieldlink_cloud_duplicates_dropped", "Replays dropped by the dedup window", h.get("duplicates_dropped")
    )
    yield counter("fieldlink_cloud_bad_messages", "Messages that could not be used", h.get("bad_messages"))
    yield counter(
        "fieldlink_cloud_dead_letters", "Bad messages set aside on the dead-letter topic", h.get("dead_letters")
    )
    yield counter(
        "fieldlink_cloud_store_failures", "Store writes that failed and were retried", h.get("store_failures")
    )
    write = gauge("fieldlink_cloud_store_write_seconds", "Store write latency", None, {"quantile": ""})
    for quantile, key in (("0.5", "p50"), ("0.99", "p99")):
        value = (h.get("store_write_ms") or {}).get(key)
        if value is not None:
            write.add_metric([quantile], value / 1000)
    yield write
    spool = h.get("spool") or {}
    yield gauge("fieldlink_cloud_spool_records", "Records waiting in the spool", spool.get("records"))
    yield gauge(
        "fieldlink_cloud_spool_oldest_age_seconds", "Age of the oldest spooled batch", spool.get("oldest_age_s")
    )
    alerts = h.get("alerts") or {}
    yield gauge("fieldlink_cloud_alerts_firing", "Alerts firing now", alerts.get("firing"))
    yield gauge("fieldlink_cloud_alerts_pending", "Alerts waiting for their 'for' duration", alerts.get("pending"))
    yield gauge("fieldlink_cloud_alerts_acknowledged", "Firing alerts acknowledged", alerts.get("acknowledged"))
    yield counter("fieldlink_cloud_alerts_fired", "Alert episodes that fired", alerts.get("fired_total"))
    yield counter("fieldlink_cloud_notifications_sent", "Notifications delivered", alerts.get("notifications_sent"))
    yield counter(
        "fieldlink_cloud_notification_failures",
        "Notification attempts that failed",
        alerts.get("notification_failures"),
    )
    yield counter(
        "fieldlink_cloud_notifications_failed_permanently",
        "Notifications refused for good (not retried)",
        alerts.get("notifications_failed_permanently"),
    )
    yield counter(
        "fieldlink_cloud_notifications_rate_limited",
        "Notifications folded into a summary by a rate limit",
        alerts.get("rate_limited_total"),
    )
    yield gauge("fieldlink_cloud_outbox_pending", "Notifications waiting in the outbox", alerts.get("outbox_pending"))
