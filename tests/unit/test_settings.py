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
    llm = deployments["LocalLLM"]["ray_actor_options"]["num_gpus"]
    embedder = deployments["Embedder"]["ray_actor_options"]["num_gpus"]
    # One vLLM replica per GPU (two never share one), with room for an Embedder beside it.
    assert 0.5 < llm < 1 and 0 < embedder <= 1 - llm


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


def _deployments(config: dict) -> dict[str, dict]:
    return {entry["name"]: entry for app in config["applications"]
            for entry in app.get("deployments", [])}


def _pool_nodes(node_types: dict[str, dict]) -> dict[str, list[dict]]:
    pools: dict[str, list[dict]] = {}
    for spec in node_types.values():
        pools.setdefault((spec.get("labels") or {}).get("node-pool"), []).append(
            spec["resources"])
    return pools


def _check_placement(config: dict, node_types: dict[str, dict]) -> None:
    """Every deployment names a node pool that exists, asks for a GPU exactly when its pool
    has GPUs, and one replica fits a node of its pool; the GPU pool's deployments share
    one node (LocalLLM beside an Embedder)."""
    pools = _pool_nodes(node_types)
    gpu_asks = {"CPU": 0.0, "GPU": 0.0}
    for name, entry in _deployments(config).items():
        options = entry.get("ray_actor_options", {})
        pool = options.get("label_selector", {}).get("node-pool")
        assert pool in pools, (name, pool)
        ask = {"CPU": options.get("num_cpus", 1), "GPU": options.get("num_gpus", 0)}
        assert (ask["GPU"] > 0) == (pool == "gpu"), name
        assert any(all(node.get(r, 0) >= ask[r] for r in ask) for node in pools[pool]), name
        if pool == "gpu":
            gpu_asks = {r: gpu_asks[r] + ask[r] for r in ask}
    assert any(all(node.get(r, 0) >= gpu_asks[r] for r in gpu_asks) for node in pools["gpu"])


def test_the_gpu_config_places_every_deployment_on_a_node_type_of_cluster_yaml():
    cluster = load_config(PROJECT_ROOT / "cluster.yaml")
    _check_placement(load_config(PROJECT_ROOT / "configs/gpu.yaml"),
                     cluster["available_node_types"])


def test_the_local_cluster_config_is_gpu_yaml_with_local_sizes():
    """configs/cluster-local.yaml (make cluster-up) differs from gpu.yaml only in sizes and
    paths: the same applications, deployments (up to the number of Quota shards), pools and
    kinds of resources, and it fits the local node types of deployments/multinode.py."""
    from deployments.multinode import LOCAL_NODE_SIZES, autoscaler_config

    gpu = load_config(PROJECT_ROOT / "configs/gpu.yaml")
    local = load_config(PROJECT_ROOT / "configs/cluster-local.yaml")
    assert [a["name"] for a in gpu["applications"]] == [a["name"] for a in local["applications"]]
    assert [a["import_path"] for a in gpu["applications"]] == \
        [a["import_path"] for a in local["applications"]]

    def shape(config: dict) -> dict[str, tuple]:
        return {("Quota" if name.startswith("Quota") else name):
                (entry["ray_actor_options"].get("label_selector"),
                 "num_gpus" in entry["ray_actor_options"], "autoscaling_config" in entry)
                for name, entry in _deployments(config).items()}

    assert shape(gpu) == shape(local)
    for config in (gpu, local):
        StackAppSettings.model_validate(app_config(config, "stack")["args"])
    cluster = load_config(PROJECT_ROOT / "cluster.yaml")
    node_types = autoscaler_config(cluster, "127.0.0.1:1", 0.5)["available_node_types"]
    assert set(node_types) - {"ray.head.default"} == \
        set(cluster["available_node_types"]) - {cluster["head_node_type"]}
    head_labels = cluster["available_node_types"][cluster["head_node_type"]]["labels"]
    node_types["ray.head.default"]["labels"] = head_labels
    assert set(LOCAL_NODE_SIZES) == set(cluster["available_node_types"])
    _check_placement(local, node_types)
