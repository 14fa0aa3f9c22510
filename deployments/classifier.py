"""ComplexityClassifier: prompt (text + embedding) -> complexity score and tier.
Thin shell over serve_app.routing.classifier; the model file is trained by
`make train-router`; the repository ships it (models/router/complexity-v1.json)."""
from __future__ import annotations

import logging
from typing import Any

from ray import serve

from serve_app.errors import error_boundary
from serve_app.routing.classifier import ClassifierService, ComplexityModel
from serve_app.routing.policy import RoutingPolicy, Thresholds, calibrate
from serve_app.settings import StackAppSettings

logger = logging.getLogger("ray.serve")


@serve.deployment(name="ComplexityClassifier", max_ongoing_requests=256)
@error_boundary("router classifier", code="classifier_unavailable")
class ComplexityClassifier:
    def __init__(self, settings: dict[str, Any]) -> None:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)  # tiny matrix products: BLAS threads only add contention
        stack = StackAppSettings.model_validate(settings)
        router = stack.router
        path = router.classifier.resolved(stack.data_dir)
        prices = router.tier_prices()

        def thresholds_for(model: ComplexityModel) -> Thresholds:
            return calibrate(router.policy, model.calibration, prices)

        self.service = ClassifierService(path, thresholds_for, router.classifier.reload_check_s)
        self.policy_settings = router.policy
        info = self.service.current().info()
        logger.info("router model %s loaded from %s; thresholds %s", info["model_version"],
                    path, info["thresholds"])

    def classify(self, text: str, embedding: list[float],
                 thresholds: dict[str, float] | None = None) -> dict[str, Any]:
        """-> {"score": float in [0, 1], "tier": "small"|"medium"|"large",
        "model_version": str}. `thresholds` (a key's override, optional) applies only when
        router.policy.allow_key_overrides is on."""
        classifier = self.service.current()
        policy = RoutingPolicy(self.policy_settings, classifier.thresholds)
        return classifier.classify(text, embedding, policy.thresholds_for(thresholds))

    def info(self) -> dict[str, Any]:
        return self.service.current().info()
