"""Canary rollout with automatic analysis, promotion and rollback (`kollm rollout`), without Kubernetes.

How the pieces fit:
    kollm.serve.gateway   Gateway: one ASGI app over the stable and canary serving apps (weight, header
                          override, sticky `user` hash); records each arm's status and latency.
    controller.py         RolloutController: an asyncio task in the serve process; steps, analysis windows,
                          promotion (kollm.registry.promote) / rollback (weight 0 + version tags + alert).
    analysis.py           "success_rate>=0.95,p95_ms<=2000" -> criteria -> pass / fail / inconclusive.
    clock.py              the controller's clock: SystemClock (real time) or ManualClock (tests advance it).
    state.py              RolloutSpec (settings) and RolloutState, saved atomically to .kollm/rollouts/<name>.json.
    api.py                /admin/rollout/{start,status,pause,resume,abort,promote} on the gateway (API key when set).
    client.py             what `kollm rollout ...` calls: HTTP to those endpoints; status formatting.
    serving.py            `kollm serve STABLE --canary CANARY`: load both models, build the gateway, run uvicorn.
    kollm.monitor.alerts  Slack-compatible webhook alerts.
"""
