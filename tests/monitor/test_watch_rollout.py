"""`kollm watch` hands a new challenger to the canary gateway: a healthy one is promoted, a failing one rolled back,
and a trigger during an active rollout waits for it. Real uvicorn gateway, real MLflow aliases, compressed time."""

from __future__ import annotations

import time

from kollm.monitor.watch import StateStore, WatchSettings, roll_out, run_cycle
from kollm.rollout import client as rollout_client
from kollm.rollout.api import attach_rollout
from kollm.serve.gateway import Arm, Gateway
from tests.rollout.conftest import Load, Server, registered, serving_app, tracking_uri  # noqa: F401  (fixtures)


def _gateway(registered, project, **canary_behaviour):
    name = registered.name
    gw = Gateway(
        Arm(serving_app("1", name=name), version="1", model_name=name),
        Arm(serving_app("2", name=name, **canary_behaviour), version="2", model_name=name),
    )
    attach_rollout(gw, project_dir=project, model_name=name)
    return gw


def _settings(project, url, name, **kw):
    return WatchSettings(
        project_dir=project,
        gateway=url,
        model_name=name,
        watch_data=False,
        rollout_steps="50",
        rollout_pause="0.5s",
        rollout_min_requests=3,
        rollout_timeout_s=60,
        poll_s=0.2,
        **kw,
    )


def test_a_healthy_challenger_is_promoted_and_a_failing_one_rolled_back(registered, tmp_path):
    with Server(_gateway(registered, tmp_path)) as srv, Load(srv.url, registered.name) as load:
        outcome = roll_out(_settings(tmp_path, srv.url, registered.name), registered.name, "2")
    assert outcome.kind == "promoted", outcome.message
    assert registered.alias("champion") == "2" and load.result.failed == []

    # version 2 is the champion now; register version 3 and serve it as a canary that fails half its requests
    from kollm.pipeline.tracking import client_for

    c = client_for(registered.tracking_uri)
    (tmp_path / "model-v3").mkdir()
    c.create_model_version(registered.name, source=str(tmp_path / "model-v3"))
    c.set_registered_model_alias(registered.name, "challenger", "3")
    name = registered.name
    gw = Gateway(
        Arm(serving_app("2", name=name), version="2", model_name=name),
        Arm(serving_app("3", name=name, fail_ratio=0.5), version="3", model_name=name),
    )
    attach_rollout(gw, project_dir=tmp_path, model_name=name)
    with Server(gw) as srv, Load(srv.url, name) as load:
        outcome = roll_out(_settings(tmp_path, srv.url, name), name, "3")
    assert outcome.kind == "rolled_back", outcome.message
    assert registered.alias("champion") == "2"
    assert load.result.failed == []  # the stable arm never failed; the canary's own 500s are counted apart
    assert load.result.canary_errors > 0


def test_gateway_serving_another_canary_is_reported(registered, tmp_path):
    with Server(_gateway(registered, tmp_path)) as srv:
        outcome = roll_out(
            _settings(tmp_path, srv.url, registered.name, canary_load_timeout_s=0.5), registered.name, "7"
        )
    assert outcome.kind == "gateway_not_serving_challenger" and "still serves canary 2 after 0.5s" in outcome.message
    assert "--canary models:/" in outcome.message


def test_the_canary_follows_the_challenger_alias_between_rollouts_only(registered, tmp_path):
    """A gateway started with no canary loads each newly registered challenger as its canary (weight 0), never
    during a rollout; roll_out waits for it."""
    from kollm.pipeline.tracking import client_for
    from kollm.serve.follow import AliasFollower

    name, c = registered.name, client_for(registered.tracking_uri)
    c.set_registered_model_alias(name, "challenger", "1")  # nothing new yet

    async def load(version: str) -> Arm:
        return Arm(serving_app(version, name=name), version=version, model_name=name)

    gw = Gateway(Arm(serving_app("1", name=name), version="1", model_name=name))
    controller = attach_rollout(gw, project_dir=tmp_path, model_name=name)
    follower = AliasFollower(
        gw,
        name=name,
        alias="challenger",
        load=load,
        project_dir=tmp_path,
        interval=0.1,
        arm="canary",
        swap=controller.replace_canary,
        busy=lambda: controller.state is not None and controller.state.active,
    ).attach()

    def canary() -> str | None:
        return rollout_client.command("status", gateway=srv.url)["gateway"]["canary_version"]

    with Server(gw) as srv, Load(srv.url, name) as load:
        time.sleep(0.5)
        assert canary() is None
        c.set_registered_model_alias(name, "challenger", "2")
        outcome = roll_out(
            _settings(tmp_path, srv.url, name, canary_load_timeout_s=30), name, "2"
        )  # waits for the load
        assert outcome.kind == "promoted", outcome.message
        assert follower.swaps == [("-", "2")] and canary() is None  # promoted: version 2 is the stable arm

        (tmp_path / "model-v3").mkdir()
        c.create_model_version(name, source=str(tmp_path / "model-v3"))
        c.set_registered_model_alias(name, "challenger", "3")
        deadline = time.time() + 30
        while canary() != "3" and time.time() < deadline:
            time.sleep(0.1)
        rollout_client.start(name, steps="50", pause="10m", gateway=srv.url)
        (tmp_path / "model-v4").mkdir()
        c.create_model_version(name, source=str(tmp_path / "model-v4"))
        c.set_registered_model_alias(name, "challenger", "4")
        time.sleep(1.0)
        assert canary() == "3"  # not swapped during the rollout
        rollout_client.command("abort", gateway=srv.url)
        deadline = time.time() + 30
        while canary() != "4" and time.time() < deadline:
            time.sleep(0.1)
        assert canary() == "4" and follower.swaps == [("-", "2"), ("-", "3"), ("3", "4")]
        status = rollout_client.command("status", gateway=srv.url)
        assert (
            status["rollout"] is None and status["gateway"]["canary_weight"] == 0
        )  # the aborted rollout judged version 3
    assert load.result.failed == []


def test_a_trigger_during_an_active_rollout_waits(registered, tmp_path):
    with Server(_gateway(registered, tmp_path)) as srv:
        rollout_client.start(registered.name, steps="50", pause="10m", gateway=srv.url)
        settings = _settings(tmp_path, srv.url, registered.name)
        outcome = run_cycle(settings, manual=True)
        assert outcome.kind == "waiting" and "is progressing" in outcome.message
        pending = StateStore(settings.state_dir).load().pending
        assert [t.kind for t in pending] == ["manual"]  # kept for the next cycle
        again = run_cycle(settings)
        assert again.kind == "waiting" and [t.id for t in StateStore(settings.state_dir).load().pending] == [
            pending[0].id
        ]
        rollout_client.command("abort", gateway=srv.url)
        time.sleep(0.1)
