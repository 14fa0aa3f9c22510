import time

import pytest

from serve_app.accounts.keys import bearer_token, generate_key, hash_key, parse_key_id
from serve_app.accounts.store import AccountStore, AuthFailure

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


def test_store_keeps_only_the_hash(tmp_path):
    store = AccountStore(tmp_path / "a.db", PEPPER)
    record, new = store.create_key("acme", rpm=10)
    raw = (tmp_path / "a.db").read_bytes() + (tmp_path / "a.db-wal").read_bytes()
    assert new.secret.encode() not in raw
    assert store.authenticate(new.secret).key_id == record.key_id
    assert "key_hash" not in record.public()


def test_authentication_failures(tmp_path):
    store = AccountStore(tmp_path / "a.db", PEPPER)
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


def test_rotation_replaces_the_secret_with_optional_grace(tmp_path):
    store = AccountStore(tmp_path / "a.db", PEPPER)
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


def test_store_survives_reopen_with_migrations_applied_once(tmp_path):
    store = AccountStore(tmp_path / "a.db", PEPPER)
    record, new = store.create_key("acme", allowed_models=["m1"], budget_usd=2.5,
                                   budget_period="day", route_overrides={"large_max_share": 0.1})
    store.close()
    reopened = AccountStore(tmp_path / "a.db", PEPPER)
    again = reopened.authenticate(new.secret)
    assert again.allowed_models == ["m1"] and again.budget_usd == 2.5
    assert again.route_overrides == {"large_max_share": 0.1}
    assert again.allows_model("m1") and not again.allows_model("m2")
    versions = [r[0] for r in reopened.db.execute("SELECT version FROM schema_version")]
    assert versions == [1, 2, 3, 4]


def test_unknown_fields_are_refused(tmp_path):
    store = AccountStore(tmp_path / "a.db", PEPPER)
    with pytest.raises(ValueError):
        store.create_key("acme", key_hash="forged")
