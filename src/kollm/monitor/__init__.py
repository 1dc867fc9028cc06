"""Monitoring: alert rules (kollm.monitor.alerts), the exporter, drift, `kollm watch`; JSON-lines logs: kollm.jsonlog."""
