"""Pipeline spec, wiring, the runner with its step cache, artifacts and MLflow tracking."""
