"""Imports every built-in notifier so that each registers itself."""

from cloud.notify import email, sms, webhook  # noqa: F401
