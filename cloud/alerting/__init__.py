"""Alert rules, their lifecycle and routing, and the durable notification outbox (docs/alerting.md)."""
