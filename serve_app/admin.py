"""Admin CLI over the admin HTTP API (the same routes, the same admin key).

    export LLMSTACK_ADMIN_KEY=$(cat var/secrets/admin.key)
    python -m serve_app.admin keys create --tenant acme --rpm 60 --budget-usd 5 --period day
    python -m serve_app.admin keys list --tenant acme
    python -m serve_app.admin keys update <key_id> --tpm 20000 --models smollm2-135m-instruct
    python -m serve_app.admin keys rotate <key_id> --grace-s 3600
    python -m serve_app.admin keys disable <key_id>
    python -m serve_app.admin keys budget <key_id>
    python -m serve_app.admin usage --group-by model --since 24h

Prints JSON. The admin key comes from LLMSTACK_ADMIN_KEY or --admin-key-file, never from
the command line (it would end up in shell history and process listings).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from serve_app import textmatch
from serve_app.secrets_store import admin_key_path
from serve_app.settings import resolve_data_dir

PREFIX = "/admin/v1"


_DURATION = textmatch.compile(r"(\d+(?:\.\d+)?)([smhd])")


def _duration_s(text: str) -> float:
    match = _DURATION.fullmatch(text)
    if not match:
        raise argparse.ArgumentTypeError("use e.g. 30m, 24h, 7d")
    return float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


def _admin_key(args: argparse.Namespace) -> str:
    key = os.environ.get("LLMSTACK_ADMIN_KEY")
    if key:
        return key
    path = Path(args.admin_key_file) if args.admin_key_file else admin_key_path(
        resolve_data_dir(os.environ.get("LLMSTACK_DATA_DIR", "var")))
    if not path.is_file():
        sys.exit(f"no admin key: set LLMSTACK_ADMIN_KEY or pass --admin-key-file ({path} "
                 "does not exist)")
    return path.read_text().strip()


def _key_fields(args: argparse.Namespace) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name in ("name", "rpm", "tpm", "budget_usd", "expires_at", "alert_webhook_url"):
        value = getattr(args, name, None)
        if value is not None:
            fields[name] = value
    if getattr(args, "period", None):
        fields["budget_period"] = args.period
    if getattr(args, "models", None):
        fields["allowed_models"] = [m for m in args.models.split(",") if m]
    for flag in ("can_confirm", "can_self_confirm", "cache_sampled"):
        if getattr(args, flag, None) is not None:
            fields[flag] = getattr(args, flag)
    for name in getattr(args, "clear", None) or []:
        fields[name] = None
    return fields


def _add_key_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name")
    parser.add_argument("--models", help="comma-separated allowed models (default: all)")
    parser.add_argument("--rpm", type=int)
    parser.add_argument("--tpm", type=int)
    parser.add_argument("--budget-usd", type=float)
    parser.add_argument("--period", choices=["day", "month"])
    parser.add_argument("--expires-at", help="epoch seconds or ISO 8601")
    parser.add_argument("--webhook", dest="alert_webhook_url")
    parser.add_argument("--can-confirm", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--can-self-confirm", action=argparse.BooleanOptionalAction,
                        default=None, help="may approve tool calls its own agent runs ask for")
    parser.add_argument("--cache-sampled", action=argparse.BooleanOptionalAction, default=None,
                        help="cache answers sampled with temperature > 0")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serve_app.admin", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url",
                        default=os.environ.get("LLMSTACK_BASE_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--admin-key-file", help="file holding the admin key")
    sub = parser.add_subparsers(dest="command", required=True)

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="action",
                                                                         required=True)
    create = keys.add_parser("create")
    create.add_argument("--tenant", required=True)
    _add_key_options(create)
    listing = keys.add_parser("list")
    listing.add_argument("--tenant")
    for action in ("get", "disable", "enable", "budget"):
        keys.add_parser(action).add_argument("key_id")
    update = keys.add_parser("update")
    update.add_argument("key_id")
    _add_key_options(update)
    update.add_argument("--clear", action="append",
                        choices=["rpm", "tpm", "budget_usd", "expires_at", "allowed_models",
                                 "alert_webhook_url"], help="remove a limit")
    rotate = keys.add_parser("rotate")
    rotate.add_argument("key_id")
    rotate.add_argument("--grace-s", type=float, default=0.0)

    usage = sub.add_parser("usage", help="usage and spend")
    usage.add_argument("--group-by", default="key",
                       choices=["key", "tenant", "model", "tier", "route"])
    usage.add_argument("--since", type=_duration_s, help="e.g. 24h (default: all time)")
    usage.add_argument("--tenant")
    usage.add_argument("--key", dest="key_id")
    usage.add_argument("--requests", action="store_true", help="list rows, not totals")
    usage.add_argument("--interval", type=_duration_s, dest="interval_s",
                       help="a time series in buckets of this size, e.g. 1h")
    sub.add_parser("tenants", help="list tenants")
    return parser


def run(args: argparse.Namespace, client: httpx.Client) -> Any:
    if args.command == "tenants":
        return _ok(client.get(f"{PREFIX}/tenants"))
    if args.command == "usage":
        params = {k: v for k, v in {
            "group_by": None if args.requests else args.group_by,
            "start": time.time() - args.since if args.since else None,
            "tenant_id": args.tenant, "key_id": args.key_id,
            "interval_s": None if args.requests or not args.interval_s
            else int(args.interval_s)}.items() if v is not None}
        path = f"{PREFIX}/usage/requests" if args.requests else f"{PREFIX}/usage"
        return _ok(client.get(path, params=params))
    action = args.action
    if action == "create":
        return _ok(client.post(f"{PREFIX}/keys",
                               json={"tenant_id": args.tenant, **_key_fields(args)}))
    if action == "list":
        params = {"tenant_id": args.tenant} if args.tenant else {}
        return _ok(client.get(f"{PREFIX}/keys", params=params))
    if action == "get":
        return _ok(client.get(f"{PREFIX}/keys/{args.key_id}"))
    if action == "update":
        return _ok(client.patch(f"{PREFIX}/keys/{args.key_id}", json=_key_fields(args)))
    if action in ("disable", "enable"):
        return _ok(client.post(f"{PREFIX}/keys/{args.key_id}/{action}"))
    if action == "rotate":
        return _ok(client.post(f"{PREFIX}/keys/{args.key_id}/rotate",
                               json={"grace_s": args.grace_s}))
    if action == "budget":
        return _ok(client.get(f"{PREFIX}/keys/{args.key_id}/budget"))
    raise SystemExit(f"unknown action {action}")


def _ok(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except Exception:
            message = response.text
        raise SystemExit(f"error {response.status_code}: {message}")
    return response.json()


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    headers = {"authorization": f"Bearer {_admin_key(args)}"}
    with httpx.Client(base_url=args.base_url, headers=headers, timeout=30) as client:
        print(json.dumps(run(args, client), indent=2))


if __name__ == "__main__":
    main()
