"""Alerts to a webhook: Slack-compatible JSON `{"text": ...}` (also accepted by Mattermost, Discord's /slack
endpoint, Microsoft Teams incoming webhooks and most chat tools).

The webhook URL comes from the caller (e.g. `kollm rollout start --alert-webhook URL`) or from
$KOLLM_ALERT_WEBHOOK. Sending never raises: an alert that cannot be delivered is retried a few times and then
reported back as an `AlertOutcome` with the error, so a broken webhook never breaks the rollout it reports on.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass

import httpx

log = logging.getLogger("kollm.alerts")

WEBHOOK_ENV = "KOLLM_ALERT_WEBHOOK"


@dataclass(frozen=True)
class AlertOutcome:
    delivered: bool
    attempts: int
    error: str | None = None


def webhook_url(explicit: str | None = None) -> str | None:
    """The webhook to use: the explicit one, else $KOLLM_ALERT_WEBHOOK, else None (alerts only logged)."""
    return explicit or os.environ.get(WEBHOOK_ENV) or None


def check_webhook_url(url: str) -> None:
    """Raise ConfigError unless `url` is an http(s) URL."""
    from kollm.errors import ConfigError

    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigError(
            f"alert webhook {url!r}: expected an http:// or https:// URL, e.g. https://hooks.slack.com/services/..."
        )


async def send_alert(
    url: str | None, text: str, *, attempts: int = 3, timeout_s: float = 5.0, backoff_s: float = 0.5
) -> AlertOutcome:
    """POST {"text": text} to the webhook; retry on network errors and 5xx. Without a URL the alert is only logged."""
    log.warning("alert: %s", text)
    if not url:
        return AlertOutcome(False, 0, "no webhook configured")
    error = None
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        for attempt in range(1, attempts + 1):
            try:
                r = await client.post(url, json={"text": text})
                if r.status_code < 300:
                    return AlertOutcome(True, attempt)
                error = f"webhook answered HTTP {r.status_code}: {r.text[:200]}"
                if r.status_code < 500:  # a client error will not fix itself
                    break
            except httpx.HTTPError as e:
                error = f"{type(e).__name__}: {e}"
            if attempt < attempts:
                await asyncio.sleep(backoff_s * 2 ** (attempt - 1))
    log.error("alert not delivered to %s: %s", url, error)
    return AlertOutcome(False, attempt, error)
