"""Notifier plugins (email, SMS, webhook) behind one contract; the outbox in front of them is cloud/alerting/."""
