"""Notifications: a durable outbox in front of notifier plugins (email, later SMS and webhooks)."""
