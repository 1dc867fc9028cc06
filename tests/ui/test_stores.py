"""The UI reads any MLflow store the project points at: here PostgreSQL on 127.0.0.1:5432 (no browser needed:
the pages are server-rendered, so their HTML is what a browser would show), and an unreachable one gives a clear page."""

from __future__ import annotations

from fastapi.testclient import TestClient

import kollm
from kollm.ui.app import create_app

from tests.pipeline.helpers import make_project


def project_on(root, uri):
    root = make_project(root)
    cfg = (root / "kollm.yaml").read_text()
    (root / "kollm.yaml").write_text(
        cfg.replace("project: testproj\n", f"project: testproj\ntracking: {{uri: '{uri}'}}\n")
    )
    return root


def test_pages_on_postgresql(tmp_path, postgres_uri):
    root = project_on(tmp_path / "p", postgres_uri)
    result = kollm.run(root)
    ui = TestClient(create_app(root), base_url="http://127.0.0.1")
    runs = ui.get("/runs")
    assert runs.status_code == 200 and result.run_id in runs.text and "FINISHED" in runs.text
    page = ui.get(f"/runs/{result.run_id}")
    assert page.status_code == 200
    for name in ("corpus", "count", "count2"):
        assert f'data-node="{name}"' in page.text and f'data-step="{name}"' in page.text
    step = ui.get(f"/steps/{result.steps['count'].run_id}")
    assert step.status_code == 200 and result.steps["corpus"].outputs["data"].digest[7:19] in step.text
    assert "chars=" in page.text  # the count step's metric


def test_unreachable_store_is_one_clear_message(tmp_path):
    root = project_on(tmp_path / "p", "postgresql://nobody@127.0.0.1:1/none")
    page = TestClient(create_app(root), base_url="http://127.0.0.1").get("/runs")
    assert page.status_code == 503
    assert "cannot open the MLflow tracking store" in page.text and "Traceback" not in page.text


def test_a_password_with_odd_characters_is_masked_on_the_error_page(tmp_path):
    import html

    password = "se cr/et?#x"  # SQLAlchemy accepts '/', '?', '#' and spaces in a password
    root = project_on(tmp_path / "p", f"postgresql://nobody:{password}@127.0.0.1:1/none")
    page = TestClient(create_app(root), base_url="http://127.0.0.1").get("/runs")
    assert page.status_code == 503
    text = html.unescape(page.text)
    assert "nobody:***@127.0.0.1:1/none" in text and "cr/et" not in text, text
