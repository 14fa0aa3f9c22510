"""Gateway: the ingress deployment (FastAPI via @serve.ingress)."""
from deployments.gateway.core import Gateway

__all__ = ["Gateway"]
