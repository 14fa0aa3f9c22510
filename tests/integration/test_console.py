"""The operator console (/console) in a real browser: Debian's chromium, headless, driven by
playwright. Sign in, keys (create with the secret shown once, edit limits, disable), a chat
call appearing in the overview, the cache and documents pages, agent sessions, and the
approvals page (approve: the session continues; deny: the call is refused). Screenshots of
every page go to var/test-artifacts/console (README shows them). Unauthenticated access and
CSRF are checked over plain HTTP."""
from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from serve_app.settings import PROJECT_ROOT
from tests.support.keys import TEST_ADMIN_KEY, admin_client, create_key
from tests.support.scripted_model import ScriptedModel, answer, tool_call

ARTIFACTS = PROJECT_ROOT / "var" / "test-artifacts" / "console"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def scripted():
    model = ScriptedModel(model_name="scripted-model").start()
    yield model
    model.stop()


@pytest.fixture(scope="module")
def stack(cluster, tmp_path_factory, scripted):
    data_dir = tmp_path_factory.mktemp("console")
    cluster.deploy_stack(data_dir, {
        "router": {"providers": [{"name": "scripted", "base_url": scripted.base_url,
                                  "model": "scripted-model", "price_in_per_mtok": 1.0,
                                  "price_out_per_mtok": 2.0}],
                   "tiers": {"small": ["local"], "medium": ["local"], "large": ["local"]}},
        "agent": {"model": "scripted-model", "default_tools": ["files.write", "files.delete",
                                                               "files.list"],
                  "llm_max_tokens": 64}})
    cluster.keys = {"user": create_key(cluster.base_url, tenant="agents"),
                    "operator": create_key(cluster.base_url, tenant="agents", can_confirm=True),
                    "plain": create_key(cluster.base_url, tenant="agents")}
    return cluster


def bearer(key: dict) -> dict[str, str]:
    return {"authorization": f"Bearer {key['key']}"}


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, "no CSRF field in the page"
    return match.group(1)


@contextmanager
def sign_in(base_url: str, api_key: str) -> Iterator[tuple[httpx.Client, httpx.Response]]:
    with httpx.Client(base_url=base_url, timeout=120) as client:
        page = client.get("/console/login")
        assert page.status_code == 200
        yield client, client.post("/console/login", data={"api_key": api_key,
                                                         "csrf": csrf_of(page.text)})


# ---------------------------------------------------------------- plain HTTP checks

def test_unauthenticated_requests_get_the_sign_in_page_and_change_nothing(stack):
    with httpx.Client(base_url=stack.base_url, timeout=60) as client:
        for path in ("/console", "/console/overview", "/console/keys", "/console/cache",
                     "/console/documents", "/console/agents", "/console/approvals"):
            response = client.get(path)
            assert response.status_code == 303, path
            assert response.headers["location"] == "/console/login"
        assert client.get("/console/approvals/pending",
                          headers={"hx-request": "true"}).status_code == 401
        created = client.post("/console/keys", data={"tenant_id": "intruder"})
        assert created.status_code == 303
        forged = client.post("/console/keys", data={"tenant_id": "intruder"},
                             cookies={"llmstack_console": "forged-or-expired"})
        assert forged.status_code == 303
    with admin_client(stack.base_url) as admin:
        tenants = [t["tenant_id"] for t in admin.get("/admin/v1/tenants").json()["data"]]
    assert "intruder" not in tenants


def test_forms_need_the_session_csrf_token_and_the_same_origin(stack):
    with sign_in(stack.base_url, TEST_ADMIN_KEY) as (client, signed_in):
        assert signed_in.status_code == 303
        assert signed_in.headers["location"] == "/console/overview"
        cookie = signed_in.cookies.get("llmstack_console") or client.cookies.get(
            "llmstack_console")
        assert cookie and TEST_ADMIN_KEY not in cookie  # sealed, not the key
        set_cookie = signed_in.headers["set-cookie"].lower()
        assert "httponly" in set_cookie and "samesite=strict" in set_cookie
        page = client.get("/console/keys")
        assert page.status_code == 200 and TEST_ADMIN_KEY not in page.text
        assert page.headers["cache-control"] == "no-store"
        assert "script-src 'self'" in page.headers["content-security-policy"]
        token = csrf_of(page.text)
        for data, headers in (({"tenant_id": "csrf-a"}, {}),
                              ({"tenant_id": "csrf-b", "csrf": "0" * 64}, {}),
                              ({"tenant_id": "csrf-c", "csrf": token},
                               {"origin": "http://evil.example"})):
            refused = client.post("/console/keys", data=data, headers=headers)
            assert refused.status_code == 403, data
        made = client.post("/console/keys", data={"tenant_id": "csrf-ok", "csrf": token})
        assert made.status_code == 200 and "shown this once" in made.text
    # A sign-in form posted without its pre-session cookie (a cross-site login) is refused.
    with httpx.Client(base_url=stack.base_url, timeout=60) as other:
        assert other.post("/console/login", data={"api_key": TEST_ADMIN_KEY,
                                                  "csrf": "x"}).status_code == 403
    with admin_client(stack.base_url) as admin:
        tenants = {t["tenant_id"] for t in admin.get("/admin/v1/tenants").json()["data"]}
    assert "csrf-ok" in tenants and not tenants & {"csrf-a", "csrf-b", "csrf-c"}


def test_only_the_admin_key_or_a_confirming_key_signs_in_and_roles_hold(stack):
    with sign_in(stack.base_url, stack.keys["plain"]["key"]) as (_, refused):
        assert refused.status_code == 401 and "not the admin key" in refused.text
    with sign_in(stack.base_url, "sk-not-a-key") as (_, wrong):
        assert wrong.status_code == 401
    with sign_in(stack.base_url, stack.keys["operator"]["key"]) as (client, approver):
        assert approver.headers["location"] == "/console/approvals"
        assert client.get("/console/approvals").status_code == 200
        for path in ("/console/keys", "/console/overview", "/console/agents"):
            assert client.get(path).status_code == 403, path
        token = csrf_of(client.get("/console/approvals").text)
        assert client.post("/console/keys", data={"tenant_id": "by-approver",
                                                  "csrf": token}).status_code == 403
        # A key disabled while signed in ends the session on its next page.
        with admin_client(stack.base_url) as admin:
            temp = admin.post("/admin/v1/keys", json={"tenant_id": "agents",
                                                      "can_confirm": True}).json()
        with sign_in(stack.base_url, temp["key"]) as (signed, response):
            assert response.status_code == 303
            with admin_client(stack.base_url) as admin:
                admin.post(f"/admin/v1/keys/{temp['key_id']}/disable")
            after = signed.get("/console/approvals/pending")
            assert after.status_code == 303 and after.headers["location"] == "/console/login"


def test_the_admin_api_lists_sessions_and_pending_confirmations_the_console_shows(stack,
                                                                                  scripted):
    session_id, call_id = pause_on(stack, scripted, "files.write",
                                   {"path": "api.txt", "content": "x"})
    with admin_client(stack.base_url) as admin:
        listed = admin.get("/admin/v1/agent/sessions", params={"tenant": "agents"})
        assert listed.status_code == 200, listed.text
        assert session_id in [s["id"] for s in listed.json()["data"]]
        waiting = admin.get("/admin/v1/agent/sessions",
                            params={"status": "awaiting_confirmation"}).json()["data"]
        assert session_id in [s["id"] for s in waiting]
        assert admin.get("/admin/v1/agent/sessions",
                         params={"status": "bogus"}).status_code == 422
    with httpx.Client(base_url=stack.base_url, timeout=60,
                      headers=bearer(stack.keys["operator"])) as operator:
        pending = operator.get("/v1/agent/confirmations").json()["data"]
        mine = next(p for p in pending if p["id"] == session_id)
        assert mine["pending_confirmation"]["call_id"] == call_id
        assert operator.get("/admin/v1/agent/sessions").status_code in (401, 403)
    with httpx.Client(base_url=stack.base_url, timeout=60,
                      headers=bearer(stack.keys["plain"])) as plain:
        assert plain.get("/v1/agent/confirmations").status_code == 403


# ---------------------------------------------------------------- the browser

@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.fail("Debian's chromium is missing: `make test` installs it (make chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        instance = driver.chromium.launch(executable_path=CHROMIUM, headless=True,
                                          args=["--no-sandbox"])
        yield instance
        instance.close()


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"console_{name}.png"), full_page=True)


def browser_sign_in(browser, base_url: str, api_key: str):
    context = browser.new_context(viewport={"width": 1400, "height": 900}, base_url=base_url)
    page = context.new_page()
    page.goto("/console/login")
    if api_key == TEST_ADMIN_KEY:
        shot(page, "login")
    page.fill("#api-key", api_key)
    page.click("#sign-in")
    return context, page


def pause_on(stack, scripted, tool: str, arguments: dict) -> tuple[str, str]:
    scripted.script(tool_call(tool.replace(".", "_"), arguments), answer(f"{tool} handled."))
    with httpx.Client(base_url=stack.base_url, timeout=300,
                      headers=bearer(stack.keys["user"])) as client:
        session = client.post("/v1/agent/sessions", json={"goal": "console test"}).json()
        paused = client.post(f"/v1/agent/sessions/{session['id']}/messages",
                             json={"content": f"use {tool}"}).json()
    assert paused["status"] == "awaiting_confirmation", paused
    return session["id"], paused["pending_confirmation"]["call_id"]


def test_the_console_in_a_real_browser(stack, scripted, browser):
    context, page = browser_sign_in(browser, stack.base_url, TEST_ADMIN_KEY)
    try:
        page.wait_for_url("**/console/overview")
        # JS and charts load from the stack itself (CSP: 'self' only).
        assert page.evaluate("typeof Chart") == "function"
        assert page.evaluate("typeof htmx") == "object"

        # Keys: create one; its secret is shown once, never in a URL or a later page.
        page.click("#nav-keys")
        page.fill("#create-key input[name=tenant_id]", "console-shop")
        page.fill("#create-key input[name=name]", "storefront")
        page.fill("#create-key input[name=rpm]", "50")
        page.click("#create-key-submit")
        secret = page.inner_text("#new-key-secret").strip()
        key_id = page.inner_text("#new-key-id").strip()
        assert len(secret) >= 32 and secret not in page.url
        shot(page, "key_created")
        page.goto("/console/keys")
        assert secret not in page.content()
        row = page.locator(f"#key-{key_id}")
        assert row.locator("input[name=rpm]").input_value() == "50"
        row.locator("input[name=rpm]").fill("75")
        row.locator("form.limits button").click()
        assert "updated" in page.inner_text("#notice")
        assert page.locator(f"#key-{key_id} input[name=rpm]").input_value() == "75"
        shot(page, "keys")

        # A chat call with the new key shows up in the overview (twice: a miss, then a hit).
        scripted.script(answer("Opening hours are 9 to 5."))
        with httpx.Client(base_url=stack.base_url, timeout=300,
                          headers={"authorization": f"Bearer {secret}"}) as client:
            for _ in range(2):
                chat = client.post("/v1/chat/completions", json={
                    "model": "scripted-model", "temperature": 0,
                    "messages": [{"role": "user", "content": "When are you open?"}]})
                assert chat.status_code == 200, chat.text
        assert chat.headers.get("x-cache") == "hit"
        page.goto("/console/overview?range=1h&group_by=key")
        table = page.inner_text("#usage-table")
        assert key_id in table
        assert key_id in page.inner_text("#recent-requests")
        page.wait_for_function("document.querySelectorAll('canvas').length >= 6")
        shot(page, "overview")

        # Cache: the answer is an entry of console-shop; mark it wrong, it is gone.
        page.goto("/console/cache?tenant=console-shop")
        assert "When are you open?" in page.inner_text("#entries-table")
        assert "console-shop" in page.inner_text("#namespaces-table")
        shot(page, "cache")
        page.locator("#entries-table form button").first.click()
        assert "marked" in page.inner_text("#notice")
        page.goto("/console/cache?tenant=console-shop")
        assert "When are you open?" not in page.inner_text("#entries-table")

        # Documents: an ingested document is listed with its version, then deleted.
        with httpx.Client(base_url=stack.base_url, timeout=300,
                          headers={"authorization": f"Bearer {secret}"}) as client:
            for version in (1, 2):
                ingested = client.post("/v1/collections/manuals/documents", json={
                    "documents": [{"id": "hours", "title": "Opening hours",
                                   "content": f"We open at {8 + version}."}]})
                assert ingested.status_code == 201, ingested.text
        page.goto("/console/documents?tenant=console-shop&collection=manuals")
        doc_row = page.locator("#doc-hours")
        assert "Opening hours" in doc_row.inner_text()
        assert doc_row.locator("td").nth(2).inner_text().strip() == "2"  # its version
        shot(page, "documents")
        doc_row.locator("button").click()
        assert "deleted hours" in page.inner_text("#notice")
        assert page.locator("#doc-hours").count() == 0

        # Approvals, live: a pending call appears without reloading; approve it and the
        # session continues to its answer; the audit log shows who approved.
        page.goto("/console/approvals")
        session_id, call_id = pause_on(stack, scripted, "files.write",
                                       {"path": "notes.txt", "content": "hello"})
        pending = page.locator(f"#pending-{call_id}")
        pending.wait_for(timeout=30_000)  # polled in by htmx
        assert "notes.txt" in pending.locator("pre.arguments").inner_text()
        assert "files.write" in pending.inner_text()
        shot(page, "approvals")
        pending.locator("button.approve").click()
        page.wait_for_url(f"**/console/agents/{session_id}*")
        assert page.inner_text("#session-status") == "completed"
        assert "files.write handled." in page.inner_text("#last-answer")
        audit = page.inner_text("#audit-table")
        assert "approved" in audit and "succeeded" in audit and "admin" in audit
        assert "verified" in page.inner_text("#chain-status")
        shot(page, "agent_session")

        # Deny: the call is refused and never runs.
        page.goto("/console/approvals")
        session_id, call_id = pause_on(stack, scripted, "files.delete",
                                       {"path": "important.txt"})
        pending = page.locator(f"#pending-{call_id}")
        pending.wait_for(timeout=30_000)
        pending.locator("button.deny").click()
        page.wait_for_url(f"**/console/agents/{session_id}*")
        assert "denied" in page.inner_text("#notice")
        audit = page.inner_text("#audit-table")
        assert "denied" in audit and "succeeded" not in audit

        opened = page.goto("/console/agents")
        assert opened is not None and opened.status == 200, page.inner_text("body")[:800]
        assert session_id in page.inner_text("#sessions-table")
        shot(page, "agents")

        # Disable the key from its page: the next chat call with it is refused.
        page.goto("/console/keys?tenant=console-shop")
        page.locator(f"#key-{key_id} button", has_text="Disable").click()
        assert "disabled" in page.inner_text(f"#key-{key_id}")
        with httpx.Client(base_url=stack.base_url, timeout=60,
                          headers={"authorization": f"Bearer {secret}"}) as client:
            assert client.get("/v1/models").status_code == 401
    finally:
        context.close()


def test_a_confirming_key_sees_only_the_approvals_page_in_the_browser(stack, scripted,
                                                                      browser):
    context, page = browser_sign_in(browser, stack.base_url, stack.keys["operator"]["key"])
    try:
        page.wait_for_url("**/console/approvals")
        assert page.locator("#nav-keys").count() == 0
        session_id, call_id = pause_on(stack, scripted, "files.write",
                                       {"path": "b.txt", "content": "x"})
        pending = page.locator(f"#pending-{call_id}")
        pending.wait_for(timeout=30_000)
        pending.locator("button.approve").click()
        page.wait_for_url(f"**/console/agents/{session_id}*")
        assert page.inner_text("#session-status") == "completed"
        assert stack.keys["operator"]["key_id"] in page.inner_text("#audit-table")
        page.goto("/console/keys")
        assert "needs the admin key" in page.inner_text("#error-message")
    finally:
        context.close()
