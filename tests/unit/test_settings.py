from pathlib import Path

import pytest
from pydantic import ValidationError

from deployments.launch import app_config, load_config
from serve_app.settings import PROJECT_ROOT, ModelsAppSettings, StackAppSettings


def test_defaults_are_valid_and_data_dir_is_project_relative():
    settings = StackAppSettings()
    assert settings.data_dir == PROJECT_ROOT / "var"
    assert settings.models_app == "models"


def test_absolute_data_dir_is_kept(tmp_path: Path):
    assert ModelsAppSettings(data_dir=tmp_path).data_dir == tmp_path


def test_unknown_keys_are_rejected_with_their_name():
    with pytest.raises(ValidationError) as caught:
        StackAppSettings.model_validate({"gateway": {"max_body_byte": 10}})
    assert "max_body_byte" in str(caught.value)


@pytest.mark.parametrize("bad", [{"max_body_bytes": 10}, {"request_timeout_s": 0},
                                 {"log_prompts": "sometimes"}])
def test_gateway_limits_are_validated(bad):
    with pytest.raises(ValidationError):
        StackAppSettings.model_validate({"gateway": bad})


def test_models_app_must_be_named():
    with pytest.raises(ValidationError):
        StackAppSettings.model_validate({"models_app": "  "})


def test_local_llm_context_window_is_bounded():
    with pytest.raises(ValidationError):
        ModelsAppSettings.model_validate({"local_llm": {"max_model_len": 16}})


@pytest.mark.parametrize("config", ["configs/local.yaml", "configs/gpu.yaml"])
def test_shipped_serve_configs_validate(config):
    from ray.serve.schema import ServeDeploySchema

    loaded = load_config(PROJECT_ROOT / config)
    ServeDeploySchema.model_validate(loaded)
    ModelsAppSettings.model_validate(app_config(loaded, "models")["args"])
    StackAppSettings.model_validate(app_config(loaded, "stack")["args"])


def test_gpu_config_puts_vllm_on_gpus():
    loaded = load_config(PROJECT_ROOT / "configs/gpu.yaml")
    deployments = {d["name"]: d for d in app_config(loaded, "models")["deployments"]}
    assert deployments["LocalLLM"]["ray_actor_options"]["num_gpus"] == 1
    assert 0 < deployments["Embedder"]["ray_actor_options"]["num_gpus"] < 1


@pytest.mark.parametrize("config", ["configs/local.yaml", "configs/gpu.yaml"])
def test_config_overrides_name_the_quota_shards_the_app_builds(config):
    """Serve refuses a config that overrides a deployment the app does not have."""
    from deployments.app import quota_shards

    stack = app_config(load_config(PROJECT_ROOT / config), "stack")
    settings = StackAppSettings.model_validate(stack["args"])
    built = {shard._bound_deployment.name for shard in quota_shards(settings)}
    overridden = {d["name"] for d in stack["deployments"] if d["name"].startswith("Quota")}
    assert overridden == built and len(built) == settings.quota.shards


def test_the_local_config_fits_a_two_core_laptop_at_its_maximum_scale():
    """`serve run configs/local.yaml` starts Ray with the machine's CPUs; a replica whose
    ask does not fit waits forever without an error (seen with LocalLLM at 1 CPU)."""
    from deployments.app import quota_shard_names

    loaded = load_config(PROJECT_ROOT / "configs/local.yaml")
    total = 0.0
    for app in loaded["applications"]:
        names = {d["name"] for d in app.get("deployments", [])}
        for entry in app["deployments"]:
            replicas = (entry.get("autoscaling_config") or {}).get(
                "max_replicas", entry.get("num_replicas", 1))
            total += replicas * entry.get("ray_actor_options", {}).get("num_cpus", 1)
        if app["name"] == "stack":
            # Every deployment the app builds has an entry (no default 1-CPU ask hides).
            shards = StackAppSettings.model_validate(app["args"]).quota.shards
            assert names >= {"Gateway", "SemanticCache", "Retriever", "ComplexityClassifier",
                             "AgentRunner", *quota_shard_names(shards)}
        else:
            assert names == {"ModelsRoot", "LocalLLM", "Embedder"}
    assert total <= 2.0, total
