"""`kollm ui`'s guards on state changes, over HTTP to a real uvicorn on 127.0.0.1 and from a real browser: a page
on another local port cannot promote through the user's session, sessions expire, and a foreign `Host` (DNS
rebinding) gets a 400. The project has no runs: these pages never open MLflow."""

from __future__ import annotations

import re
import time

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import HTMLResponse
from starlette.routing import Route

from kollm.ui.app import COOKIE, SESSION_TTL_S, create_app, new_session

from tests.rollout.conftest import Server
from tests.ui.project import make_project

KEY = "security-key"


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("uisec") / "p")
    with Server(create_app(project, api_key=KEY, host="127.0.0.1")) as srv:
        yield srv


def unlock(url: str, **headers: str) -> httpx.Response:
    return httpx.post(f"{url}/unlock", data={"api_key": KEY, "next": "/lineage"}, headers=headers)


def session(url: str) -> tuple[str, str]:
    """A fresh session cookie and the CSRF token its pages carry."""
    r = unlock(url)
    assert r.status_code == 303, r.text
    cookie = r.cookies[COOKIE]
    page = httpx.get(f"{url}/lineage", cookies={COOKIE: cookie})
    found = re.search(r'name="csrf-token" content="([0-9a-f]+)"', page.text)
    assert found, page.text
    return cookie, found.group(1)


def test_foreign_host_is_refused(ui):
    port = ui.port
    assert httpx.get(f"{ui.url}/lineage").status_code == 200
    for good in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"):
        assert httpx.get(f"{ui.url}/lineage", headers={"Host": good}).status_code == 200, good
    for bad in (f"evil.example:{port}", "attacker.test", f"192.0.2.1:{port}"):
        r = httpx.get(f"{ui.url}/lineage", headers={"Host": bad})
        assert r.status_code == 400 and "does not answer to Host" in r.text, bad
    r = httpx.post(f"{ui.url}/unlock", data={"api_key": KEY}, headers={"Host": "evil.example"})
    assert r.status_code == 400 and COOKIE not in r.cookies


def test_session_cookie_expires(ui):
    r = unlock(ui.url)
    header = r.headers["set-cookie"]
    assert f"Max-Age={SESSION_TTL_S}" in header and "HttpOnly" in header and "SameSite=strict" in header
    # the server checks the time in the signed value too: an old cookie kept by a browser is not a session
    old = new_session(KEY, now=time.time() - SESSION_TTL_S - 5)
    page = httpx.get(f"{ui.url}/lineage", cookies={COOKIE: old})
    assert "actions locked" in page.text
    r = httpx.post(f"{ui.url}/unlock", data={"next": "/"}, cookies={COOKIE: old})
    assert r.status_code == 403 and "session expired" in r.text
    forged = new_session("another-key")
    assert "actions locked" in httpx.get(f"{ui.url}/lineage", cookies={COOKIE: forged}).text
    fresh, _ = session(ui.url)
    assert fresh != session(ui.url)[0]  # not a fixed value derived from the key
    assert "actions unlocked" in httpx.get(f"{ui.url}/lineage", cookies={COOKIE: fresh}).text


def test_state_changes_need_the_csrf_token_and_the_same_origin(ui):
    cookie, csrf = session(ui.url)
    post = f"{ui.url}/unlock"
    r = httpx.post(post, data={"next": "/"}, cookies={COOKIE: cookie})
    assert r.status_code == 403 and "CSRF" in r.text
    r = httpx.post(post, data={"next": "/", "csrf": "0" * 64}, cookies={COOKIE: cookie})
    assert r.status_code == 403
    assert httpx.post(post, data={"next": "/", "csrf": csrf}, cookies={COOKIE: cookie}).status_code == 303
    other_port = f"http://127.0.0.1:{ui.port + 1}"
    for headers in (
        {"Origin": other_port},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "same-site"},
        {"Sec-Fetch-Site": "cross-site"},
    ):
        r = httpx.post(post, data={"next": "/", "csrf": csrf}, cookies={COOKIE: cookie}, headers=headers)
        assert r.status_code == 403 and "refused a state change" in r.text, headers
        assert unlock(ui.url, **headers).status_code == 403, headers  # even with the typed key
    same = {"Origin": ui.url, "Sec-Fetch-Site": "same-origin"}
    assert httpx.post(post, data={"next": "/", "csrf": csrf}, cookies={COOKIE: cookie}, headers=same).status_code == 303


def test_a_page_on_another_local_port_cannot_use_the_session(ui, browser):
    """SameSite=Strict sends the cookie from another port of 127.0.0.1 (same site): the Origin check stops it."""
    attack = (
        f'<form id="f" method="post" action="{ui.url}/registry/ui-demo/rollback">'
        '<input name="reason" value="pwned"></form><script>document.getElementById("f").submit()</script>'
    )
    evil = Starlette(routes=[Route("/", lambda request: HTMLResponse(attack))])
    context = browser.new_context()
    try:
        pg = context.new_page()
        pg.goto(f"{ui.url}/lineage")
        pg.evaluate(
            """async ([url, key]) => { await fetch(url + "/unlock", {method: "POST", body: new URLSearchParams(
            {api_key: key, next: "/lineage"})}); }""",
            [ui.url, KEY],
        )
        pg.reload()
        assert "actions unlocked" in pg.locator("header").text_content()
        with Server(evil) as attacker:
            with pg.expect_navigation(url=f"{ui.url}/registry/ui-demo/rollback"):
                pg.goto(attacker.url)
            assert "refused a state change" in pg.locator(".error-msg").text_content()
    finally:
        context.close()
