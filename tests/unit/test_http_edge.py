"""The HTTP edge without Ray: error shapes, body limit, request ids, the completion hook."""
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel

from serve_app.errors import ApiError
from deployments.http_edge import RequestEdgeMiddleware, install_error_handlers, register_edge_hooks

completed = []


class Body(BaseModel):
    name: str
    count: int


app = FastAPI()
install_error_handlers(app)
app.add_middleware(RequestEdgeMiddleware)


@app.post("/echo")
async def echo(body: Body):
    return body.model_dump()


@app.get("/teapot")
async def teapot():
    raise ApiError(429, "slow down", code="rate_limited", headers={"retry-after": "3"})


@app.get("/boom")
async def boom():
    raise RuntimeError("secret internals")


def client() -> TestClient:
    register_edge_hooks(max_body_bytes=2048, on_complete=completed.append)
    return TestClient(app, raise_server_exceptions=False)


def test_valid_request_gets_a_request_id_and_is_recorded():
    completed.clear()
    response = client().post("/echo", json={"name": "a", "count": 1})
    assert response.status_code == 200 and response.headers["x-request-id"]
    assert completed[-1].status == 200 and completed[-1].route == "/echo"


def test_well_formed_client_request_id_is_reused_and_junk_is_replaced():
    assert client().post("/echo", json={"name": "a", "count": 1},
                         headers={"x-request-id": "abc-123"}).headers["x-request-id"] == "abc-123"
    replaced = client().post("/echo", json={"name": "a", "count": 1},
                             headers={"x-request-id": "bad id with spaces"})
    assert replaced.headers["x-request-id"] != "bad id with spaces"


def test_malformed_json_is_400():
    response = client().post("/echo", content=b"{nope", headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"


def test_schema_violation_is_422_naming_the_field():
    response = client().post("/echo", json={"name": "a", "count": "many"})
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "count"


def test_declared_and_streamed_oversized_bodies_are_413():
    response = client().post("/echo", json={"name": "x" * 5000, "count": 1})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"

    def chunks():
        for _ in range(10):
            yield b"x" * 1000

    streamed = client().post("/echo", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413


def test_api_error_keeps_status_code_and_headers():
    response = client().get("/teapot")
    assert response.status_code == 429 and response.headers["retry-after"] == "3"
    assert response.json() == {"error": {"message": "slow down", "type": "rate_limit_error",
                                         "param": None, "code": "rate_limited"}}


def test_unhandled_exception_is_500_without_internals():
    completed.clear()
    response = client().get("/boom")
    assert response.status_code == 500
    assert "secret" not in response.text and "Traceback" not in response.text
    assert completed[-1].error_code == "internal_error"


def test_unknown_route_is_openai_shaped_404():
    response = client().get("/missing")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
