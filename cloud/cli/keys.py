"""``ecos-cloud keys``: the cloud's signing keys, rotation and revocation (docs/security.md)."""

from __future__ import annotations

import argparse
import json

from device_sdk.clikit import add_common
from device_sdk.fsutil import atomic_write_bytes


def _keyring(args: argparse.Namespace, create: bool = False):
    from cloud.security.keys import KeyRing
    from cloud.serve.config import load_config

    keys_dir = args.keys_dir or load_config(args.config).store.key_dir
    return KeyRing(keys_dir, create=create)


def _print_ring(ring, as_json: bool = False) -> None:
    info = ring.describe()
    if as_json:
        print(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        print(f"{key:>18}: {', '.join(value) if isinstance(value, list) else value}")


def cmd_keys(args: argparse.Namespace) -> int:
    action = args.action
    if action == "revoke" and not args.key_id:
        from device_sdk.errors import UsageError

        raise UsageError("keys revoke needs the KEY_ID to revoke")
    ring = _keyring(args, create=action in ("show", "next"))
    if action == "next":
        key = ring.new_next()
        print(
            f"next key {key.key_id}: {ring.next_public_key_path}. Devices learn it from the key update the daemon "
            "sends before each probe (restart the daemon), or from 'ecos-cloud keys update --out FILE'. Promote it "
            "once every device lists it in its status."
        )
    elif action == "promote":
        old = ring.current.key_id
        key = ring.promote()
        print(
            f"{key.key_id} is now the current key (restart the daemon to sign with it); {old} is retired under "
            f"{ring.directory / 'retired'}. Revoke {old} once no delivery signed with it is in flight."
        )
    elif action == "revoke":
        ring.revoke(args.key_id)
        print(f"{args.key_id} revoked (serial {ring.serial}); devices refuse it once they have the next key update")
    elif action == "update":
        update = ring.key_update()
        if update is None:
            print("nothing to send: no next key and no revocation yet (serial 0)")
            return 0
        if not args.out:
            from device_sdk.errors import UsageError

            raise UsageError(
                "keys update needs --out FILE (apply it with 'ecos-device keys --config device.toml --apply FILE')"
            )
        payload = update.to_bytes()
        atomic_write_bytes(args.out, payload)
        print(
            f"key update {update.serial} (keys {', '.join(k['key_id'] for k in update.keys)}; revoked "
            f"{', '.join(update.revoked) or 'none'}; signed by {update.key_id}) -> {args.out} ({len(payload)} bytes)"
        )
        return 0
    _print_ring(ring, args.json)
    return 0


def _add_key_commands(sub) -> None:
    p = sub.add_parser(
        "keys",
        help="the signing keys: show, make the next one, promote it, revoke, write a key update",
        description="show: the current and next key ids, revocations. next: make the next key pair "
        "(a rotation's first step). promote: the next key becomes the current one. revoke "
        "KEY_ID: devices refuse that key once they have the next key update. update --out "
        "FILE: the signed key update for 'ecos-device keys --apply' (the daemon sends it "
        "before every probe by itself). See docs/security.md for the whole procedure.",
    )
    p.add_argument("action", choices=("show", "next", "promote", "revoke", "update"))
    p.add_argument("key_id", nargs="?", metavar="KEY_ID", help="revoke: the key id to revoke")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--config", help="cloud.toml: the keys live in its [store] keys_dir (default <state_dir>/keys)")
    where.add_argument("--keys-dir", help="the keys folder itself")
    p.add_argument("--out", help="update: where to write the key update message")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_common(p)
    p.set_defaults(func=cmd_keys)
