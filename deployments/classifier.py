"""ComplexityClassifier: prompt (text + embedding) -> complexity score and tier.
Thin shell over serve_app.routing.classifier; the model file is trained by
`make train-router`; the repository ships it (models/router/complexity-v1.json)."""
from __future__ import annotations

import logging
import threading
from typing import Any

from ray import serve

from deployments.metrics import RouterMetrics
from serve_app.errors import error_boundary
from serve_app.routing.drift import TierDrift, expected_shares
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
        self.metrics = RouterMetrics()
        self._drift_lock = threading.Lock()
        self._drift_key: tuple[str, Thresholds] | None = None
        self._drift = TierDrift({})
        info = self.service.current().info()
        logger.info("router model %s loaded from %s; thresholds %s", info["model_version"],
                    path, info["thresholds"])

    def classify(self, text: str, embedding: list[float],
                 thresholds: dict[str, float] | None = None,
                 tenant: str | None = None) -> dict[str, Any]:
        """-> {"score": float in [0, 1], "tier": "small"|"medium"|"large",
        "model_version": str}. `thresholds` (a key's override, optional) applies only when
        router.policy.allow_key_overrides is on. `tenant` labels the score and tier
        metrics and the drift guard."""
        classifier = self.service.current()
        policy = RoutingPolicy(self.policy_settings, classifier.thresholds)
        chosen = policy.thresholds_for(thresholds)
        result = classifier.classify(text, embedding, chosen)
        self._observe(classifier, tenant or "anonymous", result,
                      calibrated=chosen == classifier.thresholds)
        return result

    def _observe(self, classifier: Any, tenant: str, result: dict[str, Any],
                 calibrated: bool) -> None:
        self.metrics.routed(tenant, result["tier"], result["score"])
        if not calibrated:  # a key's own thresholds: other shares are expected
            return
        # Sync method: Serve runs it in a thread pool, so the windows take a lock.
        with self._drift_lock:
            key = (classifier.model.version, classifier.thresholds)
            if self._drift_key != key:
                self._drift_key = key
                calibration = classifier.model.calibration or {}
                self._drift = TierDrift(expected_shares(
                    calibration.get("scores") or [], classifier.thresholds.small_below,
                    classifier.thresholds.large_from))
            before = self._drift.drifting(tenant) if self._drift.tracked(tenant) else None
            report = self._drift.observe(tenant, result["tier"])
            drifting = self._drift.drifting(tenant)
        if drifting != before:  # a gauge keeps its value: set it when a tenant's changes
            self.metrics.drift(tenant, drifting)
        if report is not None:
            logger.warning(report.message())

    def info(self) -> dict[str, Any]:
        return self.service.current().info()
