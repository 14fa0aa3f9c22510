"""The operator console's pure parts, without Ray or HTTP: the sealed session cookie and
CSRF tokens, form -> admin-API field conversion, usage rows -> chart series, per-namespace
cache statistics, and the vendoring of htmx / Chart.js by pinned integrity."""
from __future__ import annotations

import base64
import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from serve_app.cache.namespace_stats import (OVERFLOW_NAMESPACE, SIMILARITY_EDGES,
                                             NamespaceStats, similarity_bin)
from serve_app.console import charts, vendor
from serve_app.console.forms import key_fields
from serve_app.console.session import MAX_COOKIE_CHARS, SessionSealer
from serve_app.errors import ApiError

SECRET = "a-console-secret-of-enough-length"


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------- session cookie

def test_a_sealed_session_opens_and_does_not_show_the_key():
    sealer = SessionSealer(SECRET, ttl_s=3600)
    cookie, session = sealer.seal("sk-admin-secret-key", "admin")
    assert "sk-admin-secret-key" not in cookie
    opened = sealer.open(cookie)
    assert opened is not None
    assert (opened.api_key, opened.role, opened.nonce) == ("sk-admin-secret-key", "admin",
                                                           session.nonce)


def test_a_session_expires_after_its_ttl():
    clock = Clock()
    sealer = SessionSealer(SECRET, ttl_s=600, clock=clock)
    cookie, _ = sealer.seal("sk-x", "approver")
    clock.now += 599
    assert sealer.open(cookie) is not None
    clock.now += 2
    assert sealer.open(cookie) is None


@pytest.mark.parametrize("mangle", [
    lambda c: c[:-2] + ("A" if c[-2] != "A" else "B") + c[-1],  # tampered
    lambda c: "",
    lambda c: "not-a-token",
    lambda c: "é" * 40,  # not ASCII
    lambda c: c + "x" * MAX_COOKIE_CHARS,  # oversized
])
def test_a_tampered_forged_or_oversized_cookie_is_no_session(mangle):
    sealer = SessionSealer(SECRET, ttl_s=600)
    cookie, _ = sealer.seal("sk-x", "admin")
    assert sealer.open(mangle(cookie)) is None


def test_a_cookie_sealed_under_another_secret_is_no_session():
    cookie, _ = SessionSealer("another-secret-of-length", ttl_s=600).seal("sk-x", "admin")
    assert SessionSealer(SECRET, ttl_s=600).open(cookie) is None


def test_a_short_secret_is_refused():
    with pytest.raises(ValueError):
        SessionSealer("short", ttl_s=600)


def test_csrf_tokens_are_bound_to_their_nonce():
    sealer = SessionSealer(SECRET, ttl_s=600)
    token = sealer.csrf_token("nonce-a")
    assert sealer.csrf_ok("nonce-a", token)
    assert not sealer.csrf_ok("nonce-b", token)
    assert not sealer.csrf_ok("nonce-a", "0" * len(token))
    assert not sealer.csrf_ok("nonce-a", None)
    assert not sealer.csrf_ok(None, token)
    # Another deployment's secret gives other tokens.
    assert SessionSealer("another-secret-of-length", 600).csrf_token("nonce-a") != token


# ---------------------------------------------------------------- forms

def test_creating_leaves_empty_fields_out_and_converts_numbers():
    fields = key_fields({"rpm": " 50 ", "tpm": "", "budget_usd": "2.5", "name": "shop",
                         "allowed_models": "a, b,,", "can_confirm": "on"}, editing=False)
    assert fields == {"rpm": 50, "budget_usd": 2.5, "name": "shop",
                      "allowed_models": ["a", "b"], "can_confirm": True}


def test_editing_clears_empty_limits_and_reads_unchecked_flags_as_off():
    fields = key_fields({"rpm": "", "tpm": "100", "budget_usd": ""}, editing=True)
    assert fields["rpm"] is None and fields["budget_usd"] is None and fields["tpm"] == 100
    assert fields["allowed_models"] is None
    assert fields["can_confirm"] is False and fields["cache_sampled"] is False


@pytest.mark.parametrize("form", [{"rpm": "12.5"}, {"rpm": "ten"}, {"budget_usd": "nan"},
                                  {"tpm": "1e3"}])
def test_a_field_that_is_not_a_number_is_a_422_naming_it(form):
    with pytest.raises(ApiError) as error:
        key_fields(form, editing=False)
    assert error.value.status == 422
    assert error.value.param == next(iter(form))


# ---------------------------------------------------------------- charts

def test_time_series_fills_every_bucket_and_rates_errors_and_fallbacks():
    rows = [{"bucket": 0, "key_id": "a", "requests": 4, "tokens_in": 10, "tokens_out": 5,
             "cost_usd": 0.5, "saved_usd": 0.1, "errors": 1, "fallbacks": 2},
            {"bucket": 120, "key_id": "b", "requests": 1, "errors": 0, "fallbacks": 0},
            {"bucket": 9999, "key_id": "c", "requests": 100}]  # outside the range
    series = charts.time_series(rows, "key_id", start=0, end=180, interval_s=60)
    assert series["labels"] == [0, 60, 120]
    assert series["metrics"]["requests"] == {"a": [4, 0, 0], "b": [0, 0, 1]}
    assert series["metrics"]["tokens"]["a"] == [15, 0, 0]
    assert series["rates"]["errors"] == [0.25, None, 0.0]
    assert series["rates"]["fallbacks"] == [0.5, None, 0.0]


def test_time_series_sums_groups_past_the_cap_into_other():
    rows = [{"bucket": 0, "model": f"m{i}", "requests": 100 - i}
            for i in range(charts.MAX_GROUPS + 3)]
    series = charts.time_series(rows, "model", start=0, end=60, interval_s=60)
    requests = series["metrics"]["requests"]
    assert len(requests) == charts.MAX_GROUPS + 1
    assert requests[charts.OTHER] == [sum(100 - i for i in range(charts.MAX_GROUPS,
                                                                 charts.MAX_GROUPS + 3))]
    assert "m0" in requests and f"m{charts.MAX_GROUPS}" not in requests


def test_totals_put_the_biggest_spend_first_and_name_missing_groups():
    rows = [{"model": "cheap", "requests": 9, "cost_usd": 0.1},
            {"model": None, "requests": 1, "cost_usd": 0.0, "cache_hits": 1},
            {"model": "dear", "requests": 1, "cost_usd": 3.0}]
    assert [r["group"] for r in charts.totals(rows, "model")] == ["dear", "cheap", "(none)"]


# ---------------------------------------------------------------- cache namespace stats

def test_similarity_bins_cover_the_whole_range():
    assert similarity_bin(-0.3) == 0
    assert similarity_bin(1.0) == len(SIMILARITY_EDGES) - 2
    assert similarity_bin(0.93) == SIMILARITY_EDGES.index(0.925)


def test_namespace_stats_count_hits_misses_and_skips_per_scope():
    stats = NamespaceStats()
    stats.record("t1", "default", hit=True, similarity=0.97)
    stats.record("t1", "default", hit=False, similarity=0.6)
    stats.record("t1", "default", hit=False, similarity=None)
    stats.record("t1", "default", hit=False, similarity=None, skipped=True)
    stats.record("t2", "faq", hit=True, similarity=0.99)
    (scope,) = stats.snapshot("t1")
    assert (scope["lookups"], scope["hits"], scope["skipped"]) == (3, 1, 1)
    assert scope["hit_rate"] == round(1 / 3, 4)
    assert sum(scope["similarity"]["hits"]) == 1 and sum(scope["similarity"]["misses"]) == 1
    assert len(stats.snapshot()) == 2


def test_client_chosen_namespaces_past_the_cap_share_one_scope():
    stats = NamespaceStats(max_scopes=3)
    for i in range(50):
        stats.record("t", f"ns-{i}", hit=False, similarity=None)
    scopes = stats.snapshot()
    assert len(scopes) <= 4  # bounded: 3 scopes + the overflow one
    overflow = [s for s in scopes if s["namespace"] == OVERFLOW_NAMESPACE]
    assert overflow and overflow[0]["lookups"] == 47


# ---------------------------------------------------------------- vendoring

def _tarball(member: str, content: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        info = tarfile.TarInfo(member)
        info.size = len(content)
        archive.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def _asset_for(tarball: bytes, name: str = "lib.js") -> vendor.NpmAsset:
    integrity = "sha512-" + base64.b64encode(hashlib.sha512(tarball).digest()).decode()
    return vendor.NpmAsset("lib", "1.0.0", integrity, "package/dist/lib.js", name)


def test_vendoring_writes_the_pinned_file_once(tmp_path: Path, monkeypatch):
    tarball = _tarball("package/dist/lib.js", b"window.lib = 1;")
    monkeypatch.setattr(vendor, "ASSETS", (_asset_for(tarball),))
    fetched: list[str] = []

    def fetch(url: str) -> bytes:
        fetched.append(url)
        return tarball

    assert vendor.vendor(tmp_path, fetch) == ["lib.js"]
    assert (tmp_path / "lib.js").read_bytes() == b"window.lib = 1;"
    assert vendor.vendor(tmp_path, fetch) == []  # idempotent: present and stamped
    assert fetched == ["https://registry.npmjs.org/lib/-/lib-1.0.0.tgz"]


def test_a_tarball_that_does_not_match_its_pinned_integrity_is_refused(tmp_path: Path,
                                                                      monkeypatch):
    asset = _asset_for(_tarball("package/dist/lib.js", b"the published file"))
    monkeypatch.setattr(vendor, "ASSETS", (asset,))
    evil = _tarball("package/dist/lib.js", b"alert('swapped')")
    with pytest.raises(ValueError, match="integrity"):
        vendor.vendor(tmp_path, lambda url: evil)
    assert not (tmp_path / "lib.js").exists()


def test_the_shipped_pins_are_sha512_and_the_set_up_fetched_them():
    for asset in vendor.ASSETS:
        assert asset.integrity.startswith("sha512-")
        assert vendor.present(asset), f"{asset.name} missing: make models vendors it"
