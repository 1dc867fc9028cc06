"""Monitoring: JSON-lines logs (kollm.monitor.logging) and alert rules (kollm.monitor.alerts)."""
