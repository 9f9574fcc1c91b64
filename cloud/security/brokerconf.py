"""``ecos-cloud broker-config``: a Mosquitto 2 configuration where every client is one identity.

    ecos-cloud broker-config --dir ecos-broker --mode certificate --hostname broker.example.com
    ecos-cloud enroll pi-kitchen --dir ecos-broker

writes, under ``ecos-broker/broker/`` (copy it to the broker host, e.g. ``/etc/mosquitto/ecos``,
or give that path as ``--broker-path``):

* ``ecos.conf``: one TLS listener (the deployment CA, the broker's certificate for its host
  names), ``allow_anonymous false``, and the client's identity bound three ways: a certificate's
  common name *is* the user name (``require_certificate`` + ``use_identity_as_username``;
  ``crlfile`` for revoked ones) or a user name from the password file (``password_file``), and
  that user name is also the client id (``use_username_as_clientid``), so no client can take
  another's session, queued messages or connection by choosing its client id;
* ``ecos.acl``: the cloud's identity reads every device's outbox and status and writes every
  inbox; every other identity is a device and may only read ``ecos/v1/dev/<itself>/in`` and write
  ``ecos/v1/dev/<itself>/out`` and ``.../status`` (``pattern`` lines with ``%u``);
* ``ca.pem``, ``server.pem``, ``server.key`` and ``passwd`` or ``crl.pem``.

It also makes the cloud's own credentials (``clients/<cloud id>/``). The CA is made once and kept;
running the command again re-renders the files (new host names: a new server certificate).
"""

from __future__ import annotations

import argparse
import grp
import os
from pathlib import Path
from typing import Optional, Sequence

from cloud.security import pki
from cloud.security.enroll import (
    MODES,
    Deployment,
    enroll,
    issue_credentials,
    locked,
    revoke,
    write_private,
    write_public,
)
from device_sdk.errors import UsageError
from device_sdk.protocol import ROOT, is_valid_id
from device_sdk.transport import TLS_VERSIONS

DEFAULT_CLOUD_ID = "ecos-cloud"


def render_acl(cloud_id: str) -> str:
    """The topic ACL: the cloud's user, then one ``pattern`` block that every other user gets."""
    return f"""# ECOS topic ACL, written by 'ecos-cloud broker-config'. User name = client id = the identity
# (a device id, or the cloud's '{cloud_id}'). Denials are silent: a denied publish is dropped, and
# a denied subscription delivers nothing.

# The cloud daemon: reads every device's outbox and status, writes every inbox and its own status.
user {cloud_id}
topic read {ROOT}/dev/+/out
topic read {ROOT}/dev/+/status
topic write {ROOT}/dev/+/in
topic readwrite {ROOT}/cloud/status

# Every identity, devices included: only its own topics (%u is its user name, a device id).
pattern read {ROOT}/dev/%u/in
pattern write {ROOT}/dev/%u/out
pattern write {ROOT}/dev/%u/status
"""


def render_conf(d: Deployment) -> str:
    """``ecos.conf``: include it from mosquitto.conf; it should be the broker's only listener."""
    listener = f"listener {d.port}" + (f" {d.bind}" if d.bind else "")
    if d.mode == "certificate":
        identity = [
            "# The client's certificate (signed by cafile, not revoked in crlfile) is its identity:",
            "require_certificate true",
            "use_identity_as_username true",
            f"crlfile {d.on_broker('crl.pem')}",
        ]
    else:
        identity = [
            "# A user name and password from password_file is the identity:",
            "require_certificate false",
            f"password_file {d.on_broker('passwd')}",
        ]
    version = ["tls_version tlsv1.3"] if d.tls_version == "1.3" else ["# TLS 1.2 and 1.3 (Mosquitto 2's default)"]
    lines = [
        f"# ECOS broker listener ({d.mode} mode), written by 'ecos-cloud broker-config' for Mosquitto 2.",
        "# Include it from mosquitto.conf (e.g. as /etc/mosquitto/conf.d/ecos.conf); paths are where",
        "# the files are on the broker host. The broker runs as user 'mosquitto': it must be able to read them.",
        "",
        listener,
        "protocol mqtt",
        f"cafile {d.on_broker('ca.pem')}",
        f"certfile {d.on_broker('server.pem')}",
        f"keyfile {d.on_broker('server.key')}",
        *version,
        *identity,
        "# The user name (from the certificate or the password file) is also the client id, so no",
        "# client can take another's session by choosing its client id:",
        "use_username_as_clientid true",
        "",
        "# These apply to every listener unless per_listener_settings is true (then to this one):",
        "allow_anonymous false",
        f"acl_file {d.on_broker('ecos.acl')}",
        "set_tcp_nodelay true",
    ]
    return "\n".join(lines) + "\n"


def write_broker_config(
    root: Path,
    *,
    mode: str,
    hostnames: Sequence[str],
    port: int = 8883,
    bind: Optional[str] = None,
    cloud_id: str = DEFAULT_CLOUD_ID,
    tls_version: str = "1.2",
    broker_path: str = "",
    broker_group: Optional[str] = "auto",
    days: int = pki.CERT_DAYS,
    force: bool = False,
) -> Deployment:
    """Create or update the deployment folder ``root``; see the module docstring."""
    _check(mode in MODES, f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    _check(bool(hostnames), "give the broker's host name(s) or address(es) the devices connect to (--hostname)")
    _check(1 <= port <= 65535, f"--port must be 1..65535, got {port}")
    _check(is_valid_id(cloud_id), f"--cloud-id {cloud_id!r} must be 1-64 of A-Z a-z 0-9 _ . -")
    _check(tls_version in TLS_VERSIONS, f"--tls-version must be one of {', '.join(TLS_VERSIONS)}")
    root = Path(root)
    with locked(root):
        group = _broker_group(broker_group)
        try:
            d = Deployment.load(root)
        except UsageError:
            if (root / "ecos-broker.json").exists():
                raise
            d = None
        if d is not None:
            _check(d.cloud_id == cloud_id, f"{root} was made for cloud identity {d.cloud_id!r}, not {cloud_id!r}")
            devices = sorted(i for i, r in d.identities.items() if r.get("kind") != "cloud")
            _check(
                d.mode == mode or force or not devices,
                f"{root} is in {d.mode} mode with {len(devices)} enrolled device(s); --force switches to {mode} "
                "mode and forgets them (enroll them again)",
            )
            if d.mode != mode:
                d.identities, d.revoked = {}, []
            d.mode, d.hostnames, d.port, d.bind, d.tls_version = mode, list(hostnames), port, bind, tls_version
            d.broker_path, d.broker_group = broker_path, group
        else:
            d = Deployment(root, mode, cloud_id, list(hostnames), port, bind, tls_version, broker_path, group)
        if not d.ca_key_path.exists():
            ca, ca_key = pki.create_ca(f"ECOS deployment CA ({hostnames[0]})")
            write_private(d.ca_key_path, pki.key_pem(ca_key))
            write_public(d.ca_cert_path, pki.cert_pem(ca))
        ca, ca_key = d.ca()
        server, server_key = pki.issue(ca, ca_key, hostnames[0], server_names=hostnames, days=days)
        b = d.broker_dir
        write_public(b / "ca.pem", pki.cert_pem(ca))
        write_public(b / "server.pem", pki.cert_pem(server))
        write_private(b / "server.key", pki.key_pem(server_key), group=group)
        write_public(b / "ecos.acl", render_acl(cloud_id).encode())
        if mode == "certificate":
            d.write_crl()
            _remove(d.password_path)
        else:
            if not d.password_path.exists():
                write_private(d.password_path, b"", group=group)
            _remove(d.crl_path)
        write_public(b / "ecos.conf", render_conf(d).encode())
        d.save()
        if cloud_id not in d.identities:
            issue_credentials(d, cloud_id, cloud=True, rotate=False, days=days)
        return d


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UsageError(message)


def _remove(path: Path) -> None:
    if path.exists():
        path.unlink()


def _broker_group(name: Optional[str]) -> Optional[str]:
    """``auto``: the 'mosquitto' group when it exists and this process may give files to it."""
    if name != "auto":
        if name:
            try:
                grp.getgrnam(name)
            except KeyError:
                raise UsageError(f"--broker-group {name}: no such group") from None
        return name or None
    try:
        gid = grp.getgrnam("mosquitto").gr_gid
    except KeyError:
        return None
    return "mosquitto" if os.geteuid() == 0 or gid in os.getgroups() else None


# ---- the commands ------------------------------------------------------------------------------------


def cmd_broker_config(args: argparse.Namespace) -> int:
    d = write_broker_config(
        Path(args.dir),
        mode=args.mode,
        hostnames=args.hostname,
        port=args.port,
        bind=args.bind,
        cloud_id=args.cloud_id,
        tls_version=args.tls_version,
        broker_path=args.broker_path or "",
        broker_group=args.broker_group,
        days=args.days,
        force=args.force,
    )
    names = sorted(p.name for p in d.broker_dir.iterdir() if not p.name.startswith("."))
    print(
        f"broker ({d.mode} mode, port {d.port}, certificate for {', '.join(d.hostnames)}) -> {d.broker_dir}/: "
        f"{', '.join(names)}"
    )
    print(f"cloud credentials -> {d.bundle(d.cloud_id)}/ (its broker.toml is the [broker] table of cloud.toml)")
    readable = (
        f"group '{d.broker_group}'" if d.broker_group else "the user the broker runs as (chgrp mosquitto; chmod 640)"
    )
    print(
        f"next: copy {d.broker_dir}/ to {d.broker_path or 'the broker host'} (server.key"
        f"{' and passwd' if d.mode == 'password' else ''} readable by {readable}), include ecos.conf from "
        f"mosquitto.conf, restart Mosquitto; then 'ecos-cloud enroll DEVICE_ID --dir {args.dir}' per device"
    )
    return 0


def cmd_enroll(args: argparse.Namespace) -> int:
    if bool(args.device_id) == bool(args.cloud):
        raise UsageError("give a DEVICE_ID, or --cloud for the cloud's own credentials")
    root = Path(args.dir)
    if args.revoke:
        if args.cloud:
            raise UsageError("the cloud's credentials can be rotated (--cloud --rotate), not revoked")
        revoke(root, args.device_id)
        d = Deployment.load(root)
        if d.mode == "certificate":
            print(
                f"{args.device_id}: revoked (its certificate is in broker/crl.pem); copy it to the broker and "
                "restart Mosquitto (a reload refuses new connections; a restart also ends an open one)"
            )
        else:
            print(
                f"{args.device_id}: revoked (its line left broker/passwd); copy it to the broker and reload "
                "Mosquitto (SIGHUP: it also disconnects the device)"
            )
        return 0
    bundle = enroll(root, args.device_id, cloud=args.cloud, rotate=args.rotate, days=args.days)
    d = Deployment.load(root)
    who = d.cloud_id if args.cloud else args.device_id
    print(
        f"{who}: {'new ' if args.rotate else ''}{d.mode} credentials -> {bundle}/ (0600 files; broker.toml is the "
        f"[broker] table of its {'cloud' if args.cloud else 'device'}.toml)"
    )
    if d.mode == "password" or args.rotate:
        print(
            f"copy {d.broker_dir}/{'passwd' if d.mode == 'password' else 'crl.pem'} to the broker and reload "
            "Mosquitto (SIGHUP, 'systemctl reload mosquitto'); until then it accepts the old credentials only"
        )
    return 0


def add_commands(sub, add_common) -> None:
    """Register ``broker-config`` and ``enroll`` on the ``ecos-cloud`` parser."""
    p = sub.add_parser(
        "broker-config",
        help="write a Mosquitto config: TLS listener, one identity per client, topic ACL",
        description="Create (or update) the deployment folder: its CA, the broker's TLS certificate, "
        "ecos.conf and ecos.acl for Mosquitto 2 (see docs/operations.md), and the cloud's "
        "own credentials.",
    )
    p.add_argument("--dir", required=True, help="the deployment folder (keep it private: it holds the CA key)")
    p.add_argument(
        "--mode",
        choices=MODES,
        required=True,
        help="certificate: a client certificate per identity (CN = id); password: a password per identity",
    )
    p.add_argument(
        "--hostname",
        action="append",
        required=True,
        help="a name or IP address clients use to reach the broker (repeat for several; the first is used "
        "in the generated client configs)",
    )
    p.add_argument("--port", type=int, default=8883, help="the TLS listener's port (default 8883)")
    p.add_argument("--bind", help="the address to listen on (default: every interface)")
    p.add_argument(
        "--cloud-id", default=DEFAULT_CLOUD_ID, help=f"the cloud daemon's identity (default {DEFAULT_CLOUD_ID})"
    )
    p.add_argument(
        "--tls-version", choices=sorted(TLS_VERSIONS), default="1.2", help="the lowest TLS version (default 1.2)"
    )
    p.add_argument(
        "--broker-path", help="the folder broker/'s files will be in on the broker host (default: where written)"
    )
    p.add_argument(
        "--broker-group",
        default="auto",
        help="group the broker runs as: server.key and passwd are made readable to it (default: "
        "'mosquitto' if that group exists and may be used; '' for none)",
    )
    p.add_argument("--days", type=int, default=pki.CERT_DAYS, help=f"certificate lifetime (default {pki.CERT_DAYS})")
    p.add_argument(
        "--force",
        action="store_true",
        help="switch the mode even though devices are enrolled (they must be enrolled again)",
    )
    add_common(p)
    p.set_defaults(func=cmd_broker_config)

    p = sub.add_parser(
        "enroll",
        help="issue a device's broker credentials (password or client certificate) and config",
        description="Issue DEVICE_ID's credentials in the deployment folder's mode and write its bundle "
        "clients/DEVICE_ID/ (ca.pem, client.pem + client.key or broker.password, and "
        "broker.toml, the [broker] table for its device.toml); all 0600.",
    )
    p.add_argument("device_id", nargs="?", help="the device's id: its MQTT user name, client id and topics")
    p.add_argument("--dir", required=True, help="the deployment folder made by 'ecos-cloud broker-config'")
    p.add_argument("--cloud", action="store_true", help="the cloud's credentials instead of a device's")
    p.add_argument(
        "--rotate",
        action="store_true",
        help="replace existing credentials; the old ones stop working once the broker is reloaded",
    )
    p.add_argument("--revoke", action="store_true", help="withdraw the device's credentials and delete its bundle")
    p.add_argument("--days", type=int, default=pki.CERT_DAYS, help=f"certificate lifetime (default {pki.CERT_DAYS})")
    add_common(p)
    p.set_defaults(func=cmd_enroll)
