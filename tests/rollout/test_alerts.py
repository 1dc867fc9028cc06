"""Webhook alerts: Slack-compatible JSON, retries, and a broken webhook never breaks anything."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kollm.errors import ConfigError
from kollm.monitor.alerts import check_webhook_url, send_alert

from .conftest import free_port


class FlakyReceiver:
    """Answers 500 to the first `failures` posts, then 200; records every body."""

    def __init__(self, failures: int):
        self.failures, self.bodies = failures, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                outer.bodies.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
                code = 500 if len(outer.bodies) <= outer.failures else 200
                self.send_response(code)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_retries_server_errors_then_delivers():
    r = FlakyReceiver(failures=2)
    try:
        outcome = asyncio.run(send_alert(r.url, "롤백: v2", backoff_s=0.01))
    finally:
        r.close()
    assert outcome.delivered and outcome.attempts == 3
    assert r.bodies == [{"text": "롤백: v2"}] * 3


def test_unreachable_or_missing_webhook_is_reported_not_raised():
    outcome = asyncio.run(
        send_alert(f"http://127.0.0.1:{free_port()}/hook", "x", attempts=2, backoff_s=0.01, timeout_s=1)
    )
    assert not outcome.delivered and outcome.attempts == 2 and "Connect" in outcome.error
    assert asyncio.run(send_alert(None, "x")).error == "no webhook configured"


def test_webhook_url_is_checked():
    check_webhook_url("https://hooks.slack.com/services/T/B/X")
    with pytest.raises(ConfigError, match="http:// or https://"):
        check_webhook_url("hooks.slack.com/services")
