import time

import pytest

from serve_app.accounts.keys import bearer_token, generate_key, hash_key, parse_key_id
from serve_app.accounts.store import AccountStore, AuthFailure
from serve_app.database import applied_versions

PEPPER = b"pepper"


def test_keys_are_random_parseable_and_hashed_with_the_pepper():
    first, second = generate_key(PEPPER), generate_key(PEPPER)
    assert first.secret != second.secret and first.key_id != second.key_id
    assert first.secret.startswith("sk-") and parse_key_id(first.secret) == first.key_id
    assert first.key_hash == hash_key(first.secret, PEPPER) != hash_key(first.secret, b"other")
    assert first.secret not in first.key_hash


@pytest.mark.parametrize("header,x_api_key,expected", [
    ("Bearer sk-abc", None, "sk-abc"), ("bearer  sk-abc ", None, "sk-abc"),
    ("Basic xyz", None, None), (None, "sk-k", "sk-k"), (None, None, None)])
def test_bearer_token(header, x_api_key, expected):
    assert bearer_token(header, x_api_key) == expected


def test_store_keeps_only_the_hash(tmp_path, db_target, backend):
    store = AccountStore(db_target("a.db"), PEPPER)
    record, new = store.create_key("acme", rpm=10)
    if backend == "sqlite":  # the file's bytes themselves
        raw = (tmp_path / "a.db").read_bytes() + (tmp_path / "a.db-wal").read_bytes()
    else:
        raw = repr(store.db.fetchall("SELECT * FROM api_keys")).encode()
    assert new.secret.encode() not in raw
    assert store.authenticate(new.secret).key_id == record.key_id
    assert "key_hash" not in record.public()


def test_authentication_failures(db_target):
    store = AccountStore(db_target("a.db"), PEPPER)
    _, new = store.create_key("acme")
    for bad in ("", None):
        with pytest.raises(AuthFailure) as caught:
            store.authenticate(bad)
        assert caught.value.reason == "missing"
    for bad in ("sk-nope", new.secret[:-1] + ("A" if new.secret[-1] != "A" else "B"),
                "sk-" + "x" * 12 + "_" + "y" * 43):
        with pytest.raises(AuthFailure) as caught:
            store.authenticate(bad)
        assert caught.value.reason == "unknown"
    store.update(new.key_id, disabled=True)
    with pytest.raises(AuthFailure) as caught:
        store.authenticate(new.secret)
    assert caught.value.reason == "disabled"
    store.update(new.key_id, disabled=False, expires_at=time.time() - 1)
    with pytest.raises(AuthFailure) as caught:
        store.authenticate(new.secret)
    assert caught.value.reason == "expired"


def test_rotation_replaces_the_secret_with_optional_grace(db_target):
    store = AccountStore(db_target("a.db"), PEPPER)
    record, old = store.create_key("acme", rpm=5)
    new = store.rotate(record.key_id)
    assert new.key_id == record.key_id and new.secret != old.secret
    assert store.authenticate(new.secret).rpm == 5
    with pytest.raises(AuthFailure):
        store.authenticate(old.secret)
    newer = store.rotate(record.key_id, grace_s=60)
    now = time.time()
    assert store.authenticate(new.secret, now + 30).key_id == record.key_id  # grace
    with pytest.raises(AuthFailure):
        store.authenticate(new.secret, now + 61)
    assert store.authenticate(newer.secret).key_id == record.key_id


def test_store_survives_reopen_with_migrations_applied_once(db_target):
    store = AccountStore(db_target("a.db"), PEPPER)
    record, new = store.create_key("acme", allowed_models=["m1"], budget_usd=2.5,
                                   budget_period="day", route_overrides={"large_max_share": 0.1})
    store.close()
    reopened = AccountStore(db_target("a.db"), PEPPER)
    again = reopened.authenticate(new.secret)
    assert again.allowed_models == ["m1"] and again.budget_usd == 2.5
    assert again.route_overrides == {"large_max_share": 0.1}
    assert again.allows_model("m1") and not again.allows_model("m2")
    assert applied_versions(reopened.db, "accounts") == [1, 2, 3, 4]


def test_unknown_fields_are_refused(db_target):
    store = AccountStore(db_target("a.db"), PEPPER)
    with pytest.raises(ValueError):
        store.create_key("acme", key_hash="forged")


# ------------------------------------------------------------------ several processes
def test_a_key_made_by_another_process_is_found_listed_and_refreshed(db_target):
    """Two stores on one database stand for two Quota shards."""
    mine, theirs = AccountStore(db_target("a.db"), PEPPER), AccountStore(db_target("a.db"), PEPPER)
    record, new = theirs.create_key("acme", rpm=3)
    assert record.key_id not in mine.keys
    assert mine.authenticate(new.secret).key_id == record.key_id  # get() fell back to the DB
    assert record.key_id in mine.keys  # and cached it
    assert [k.key_id for k in mine.list("acme")] == [record.key_id]
    assert [t["tenant_id"] for t in mine.tenants()] == ["acme"]
    theirs.update(record.key_id, disabled=True)
    assert mine.authenticate(new.secret).key_id == record.key_id  # still the cached copy
    assert mine.refresh(record.key_id).disabled
    with pytest.raises(AuthFailure) as caught:
        mine.authenticate(new.secret)
    assert caught.value.reason == "disabled"
    # A write starts from the row as stored, not from a stale copy.
    theirs.update(record.key_id, tpm=99)
    assert mine.update(record.key_id, rpm=4).tpm == 99
    assert mine.refresh("ZZZZZZZZZZZZ") is None and mine.get("ZZZZZZZZZZZZ") is None


def test_create_key_with_a_chosen_id(db_target):
    store = AccountStore(db_target("a.db"), PEPPER)
    record, new = store.create_key("acme", key_id="Abcdefgh2345", rpm=1)
    assert record.key_id == new.key_id == "Abcdefgh2345" == parse_key_id(new.secret)
    assert store.authenticate(new.secret).rpm == 1
    with pytest.raises(ValueError, match="already exists"):
        store.create_key("other", key_id="Abcdefgh2345")
    assert AccountStore(db_target("a.db"), PEPPER).get("Abcdefgh2345").tenant_id == "acme"
    for bad in ("short", "Abcdefgh23450", "Abcdefgh234O", "Abcdefgh234_", 12345678901):
        with pytest.raises(ValueError, match="key_id"):
            store.create_key("acme", key_id=bad)
    assert [t["tenant_id"] for t in store.tenants()] == ["acme"]  # nothing half-made


def test_ensure_tenant_is_race_free(db_target):
    first, second = AccountStore(db_target("a.db"), PEPPER), AccountStore(db_target("a.db"), PEPPER)
    first.ensure_tenant("acme", "Acme")
    second.ensure_tenant("acme", "Other name")
    assert first.tenants() == [{"tenant_id": "acme", "name": "Acme",
                                "created_at": first.tenants()[0]["created_at"]}]
