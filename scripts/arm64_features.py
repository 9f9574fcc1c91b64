"""Helpers of scripts/check-arm64.sh (run inside the arm64 root with the device venv, or on the host).

    arm64_features.py --time -- CMD...                     run CMD; last line: "<wall s> <peak RSS MB>"
    arm64_features.py --encode ENCODER FOLDER PROBE OUT.npz   features of FOLDER and their nearest probe centroid
    arm64_features.py --compare X86.npz ARM.npz X86.json ARM.json [X86.json ARM.json...]   one JSON line
    arm64_features.py --round ROOTFS ARTIFACTS             an agent round: ecos-device run in the arm64 root
    arm64_features.py --report OUT.md --set KEY=VALUE...   write docs/results/pi.md

--encode and --time need only the device wheel (numpy, device_sdk); --round and --report run on the
host (paho, the cloud's delivery code).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import socket
import subprocess
import sys
import time
import uuid


def cmd_time(argv):
    start = time.monotonic()
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.monotonic() - start
    sys.stdout.write(proc.stdout[-3000:])
    if proc.returncode != 0:
        print(f"exit {proc.returncode}")
        return proc.returncode
    rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # Linux: KiB
    print(f"{wall:.2f} {rss_mb:.0f}")
    return 0


def cmd_encode(encoder, folder, probe_path, out):
    import numpy as np

    from device_sdk.imagefolder import scan_image_folder
    from device_sdk.protocol.envelope import read_file
    from device_sdk.protocol.round import Probe
    from device_sdk.runtime import load_model
    from device_sdk.scoring import encode_items

    model = load_model(encoder, threads=1)
    items = scan_image_folder(folder)
    features = encode_items(model, items, 64)
    probe = Probe.from_envelope(read_file(probe_path, "probe"), probe_path)
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # noqa: E731 - as scoring.py
    nearest = (unit(features.astype(np.float32)) @ unit(probe.centroids.astype(np.float32)).T).argmax(axis=1)
    np.savez(
        out,
        features=features,
        nearest=nearest,
        names=np.array([os.path.relpath(i.path, folder) for i in items]),
        machine=platform.machine(),
    )
    print(
        f"{len(items)} images -> {features.shape} features on {platform.machine()}; runtime {model.__class__.__name__}"
    )
    return 0


def cmd_compare(x86_npz, arm_npz, *predictions):
    import numpy as np

    a, b = np.load(x86_npz), np.load(arm_npz)
    assert list(a["names"]) == list(b["names"]), "the two runs encoded different images"
    out = {
        "machines": [str(a["machine"]), str(b["machine"])],
        "images": int(len(a["names"])),
        "max_abs_feature_diff": float(np.abs(a["features"].astype(np.float64) - b["features"]).max()),
        "feature_scale": float(np.abs(a["features"]).max()),
        "same_nearest_centroid": float(np.mean(a["nearest"] == b["nearest"])),
    }
    for x86_json, arm_json in zip(predictions[::2], predictions[1::2]):
        px, pa = json.load(open(x86_json)), json.load(open(arm_json))
        name = os.path.basename(x86_json).split(".predict.", 1)[1].rsplit(".json", 1)[0]
        rows_x = {os.path.basename(r["path"]): r for r in px["predictions"]}
        rows_a = {os.path.basename(r["path"]): r for r in pa["predictions"]}
        same = [rows_x[k]["label"] == rows_a[k]["label"] for k in rows_x]
        diff = max(abs(rows_x[k]["probability"] - rows_a[k]["probability"]) for k in rows_x)
        out[name] = {
            "images": len(same),
            "same_label": float(np.mean(same)),
            "max_abs_prob_diff": float(diff),
            "accuracy_x86": px.get("accuracy"),
            "accuracy_arm64": pa.get("accuracy"),
        }
    print(json.dumps(out))
    return 0


# ---- the agent round ---------------------------------------------------------------------------------


def cmd_round(rootfs, art):
    import queue

    from cloud.serve.delivery import ArtifactSender, build_manifest
    from device_sdk.protocol import (
        CLOUD_SUBSCRIPTIONS,
        Ack,
        Installed,
        InstallFailed,
        Probe,
        Refusal,
        Scores,
        Status,
        decode_from_device,
        inbox,
    )
    from device_sdk.protocol.envelope import read_file
    from device_sdk.transport import MqttTransport

    device_id = f"pi-arm64-{uuid.uuid4().hex[:6]}"
    messages: "queue.Queue" = queue.Queue()

    def on_message(topic, payload):
        if topic.split("/")[3] == device_id:
            messages.put(decode_from_device(topic, payload))

    def next_of(kinds, timeout):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                _, msg = messages.get(timeout=0.2)
            except queue.Empty:
                continue
            if isinstance(msg, kinds):
                return msg
        raise SystemExit(f"round: no {kinds} from {device_id} within {timeout:.0f} s")

    notify_path = os.path.join(rootfs, "tmp", "ecos-notify")
    if os.path.exists(notify_path):
        os.unlink(notify_path)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    os.chmod(notify_path, 0o777)  # the agent runs as the unprivileged ecos user, as under systemd
    notify.settimeout(1)
    cloud = MqttTransport(
        f"arm64-check-cloud-{uuid.uuid4().hex[:6]}",
        "127.0.0.1",
        1883,
        protocol="5",
        subscriptions=list(CLOUD_SUBSCRIPTIONS),
        on_message=on_message,
    )
    cloud.start()
    assert cloud.wait_connected(10), "the check's cloud client cannot reach 127.0.0.1:1883"
    env = [
        "/usr/bin/env",
        "-i",
        "PATH=/usr/bin:/bin",
        "LANG=C.UTF-8",
        "QEMU_CPU=" + os.environ.get("QEMU_CPU", ""),
        f"ECOS_DEVICE_DEVICE_ID={device_id}",
        "NOTIFY_SOCKET=/tmp/ecos-notify",
        "WATCHDOG_USEC=20000000",
    ]
    command = [
        "chroot",
        rootfs,
        *env,
        "setpriv",
        "--reuid=ecos",
        "--regid=ecos",
        "--init-groups",
        "/opt/ecos/venv/bin/ecos-device",
        "run",
        "--config",
        "/var/lib/ecos/device.toml",
        "--connect-timeout",
        "60",
    ]
    log = open(os.path.join(art, "..", "arm64.agent.log"), "w")
    start = time.monotonic()
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    facts = []
    try:
        state = b""
        while not state.startswith(b"READY=1"):
            if proc.poll() is not None:
                raise SystemExit(f"round: the agent exited with {proc.returncode}; see arm64.agent.log")
            if time.monotonic() - start > 300:
                raise SystemExit("round: no READY=1 from the agent within 300 s")
            try:
                state = notify.recv(4096)
            except socket.timeout:
                continue
        ready_s = time.monotonic() - start
        status = next_of(Status, 60)
        while status.state != "online":
            status = next_of(Status, 60)
        facts.append(f"agent (user ecos, the unit's command) ready via sd_notify after {ready_s:.0f} s emulated")
        print(f"  READY=1 after {ready_s:.1f} s; status online", file=sys.stderr)

        probe_bytes = open(os.path.join(art, "round.probe"), "rb").read()
        probe = Probe.from_envelope(read_file(os.path.join(art, "round.probe"), "probe"))
        sent = time.monotonic()
        cloud.publish(inbox(device_id), probe_bytes)
        reply = next_of((Scores, Refusal), 300)
        if isinstance(reply, Refusal):
            raise SystemExit(f"round: probe refused: {reply.code} {reply.reason}")
        assert reply.probe_id == probe.probe_id
        facts.append(
            f"signed probe answered with {reply.k} noisy scores (sigma {reply.sigma:.2f}) "
            f"in {time.monotonic() - sent:.1f} s emulated"
        )
        print(f"  {facts[-1]}", file=sys.stderr)

        artifact = os.path.join(art, "student", "student.int8.onnx")
        manifest = build_manifest(
            artifact,
            os.path.join(art, "keys", "cloud_ed25519.pem"),
            name="student",
            version=int(time.time()),
            targets=[device_id],
            chunk_size=64 << 10,
        )
        sender = ArtifactSender(cloud, device_id, artifact, manifest)
        sent = time.monotonic()
        sender.start()
        while not sender.done and time.monotonic() - sent < 300:
            try:
                _, msg = messages.get(timeout=0.05)
            except queue.Empty:
                msg = None
            if isinstance(msg, Ack):
                sender.on_ack(msg)
            elif isinstance(msg, (Installed, InstallFailed)):
                sender.on_result(msg)
            sender.tick()
        if not isinstance(sender.result, Installed):
            raise SystemExit(f"round: delivery ended with {sender.result!r}")
        facts.append(
            f"signed student.int8.onnx ({os.path.getsize(artifact) // 1024} KiB, {manifest.n_chunks} chunks) "
            f"delivered, verified and installed in {time.monotonic() - sent:.1f} s emulated"
        )
        print(f"  {facts[-1]}", file=sys.stderr)
        time.sleep(1)
        proc.terminate()  # SIGTERM, as systemctl stop
        _, wait_status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(wait_status)
        offline = next_of(Status, 30)
        while offline.state != "offline":
            offline = next_of(Status, 30)
        stopping = b""
        try:
            while not stopping.startswith(b"STOPPING=1"):
                stopping = notify.recv(4096)
        except socket.timeout:
            pass
        facts.append(
            f"SIGTERM: {'STOPPING=1, ' if stopping.startswith(b'STOPPING=1') else ''}status offline, "
            f"exit {proc.returncode}; agent peak RSS {usage.ru_maxrss // 1024} MB (qemu included)"
        )
    finally:
        if proc.poll() is None and proc.returncode is None:
            proc.kill()
        cloud.stop()
        notify.close()
        os.unlink(notify_path)
        log.close()
    print("; ".join(facts))
    return 0


# ---- the report ----------------------------------------------------------------------------------------


def _minutes(seconds) -> str:
    try:
        return f"about {round(int(seconds) / 60)} min"
    except (TypeError, ValueError):
        return "not measured"


def cmd_report(out, sets):
    v = dict(s.split("=", 1) for s in sets)
    times = {}
    for item in filter(None, v["times"].split(";")):
        name, _, rest = item.partition("=")
        times[name] = rest.split("/")
    cmp = json.loads(v["compare"])
    fp32, int8 = cmp.get("student", {}), cmp.get("student.int8", {})
    lines = [
        "# The device side on 64-bit ARM (emulated)",
        "",
        "Written by `sudo scripts/check-arm64.sh` (not part of the test suite). A Debian bookworm **arm64** root",
        "under qemu-user, the device wheel installed there by `examples/raspberry_pi/install.sh` with **aarch64**",
        "wheels from the package index, then the device commands, compared with the same ones on x86.",
        "`QEMU_CPU=cortex-a72` (a Raspberry Pi 4's core) and an ARM `/proc/cpuinfo`.",
        "",
        f"Run {time.strftime('%Y-%m-%d')}: host {v['host']}; {v['qemu']}; guest {v['python']}. "
        f"This run of the check: {int(v['total_s']) // 60} min {int(v['total_s']) % 60} s, with the root already built "
        f"(building it, debootstrap's two stages: {_minutes(v.get('rootfs_s'))}, once).",
        "",
        "## Correctness (arm64 against x86, same encoder, same images)",
        "",
        "| what | result |",
        "|---|---|",
        f"| encoder features, {cmp['images']} local images of device `lcd` | max abs difference "
        f"{cmp['max_abs_feature_diff']:.2e} (features up to {cmp['feature_scale']:.2f}) |",
        f"| nearest probe centroid (what a device's scores count) | same for "
        f"{cmp['same_nearest_centroid']:.1%} of images |",
        f"| `ecos-device predict` fp32 classifier, {fp32.get('images')} test images | same label "
        f"{fp32.get('same_label', 0):.1%}; "
        f"max abs probability difference {fp32.get('max_abs_prob_diff', float('nan')):.2e}; "
        f"accuracy x86 {fp32.get('accuracy_x86')}, arm64 {fp32.get('accuracy_arm64')} |",
        f"| `ecos-device predict` int8 classifier | same label {int8.get('same_label', 0):.1%}; "
        f"max abs probability difference {int8.get('max_abs_prob_diff', float('nan')):.2e}; "
        f"accuracy x86 {int8.get('accuracy_x86')}, arm64 {int8.get('accuracy_arm64')} |",
        "",
        "The classifier is a deliberately tiny one (resnet8, width 8, trained for seconds on 180 generated images):",
        "it is there to compare the runtimes on both machines, not to be accurate.",
        "",
        "## Agent round (arm64 `ecos-device run` against the Mosquitto broker on 127.0.0.1:1883)",
        "",
        v["round"],
        "",
        "## Install",
        "",
        f"- wheel `{v['wheel']}` (built from {v.get('source', '?')}): {v['wheel_kib']} KiB; "
        "`install.sh --wheel ... ` (user, folders, venv, `pip install "
        f"[onnx]` from the package index, units): {v['install_s']} s emulated, pip's cache "
        f"{'empty (downloads included)' if v.get('pip_cache') == 'cold' else 'warm (downloads not included)'}",
        f"- venv `/opt/ecos/venv`: **{v['venv_mb']} MB** installed, of which onnxruntime {v['ort_mb']} MB",
        f"- aarch64 packages: {v['pkgs'].strip()}",
        "",
        "## Time and memory: EMULATED, NOT Raspberry Pi figures",
        "",
        "Wall times are qemu-user translating ARM code on this x86 host; they say nothing about a Pi's speed.",
        "Peak RSS is that of the emulated process as the host kernel sees it: qemu's own memory (its translated",
        "code) is included, so it likely overstates what the process needs on a Pi with 4 KiB pages (a Pi 5",
        "kernel with 16 KiB pages can need more). The units cap the agent at MemoryMax=512M.",
        "",
        "| command (in the arm64 root) | emulated wall s | peak RSS MB |",
        "|---|---|---|",
    ]
    labels = {
        "version": "`ecos-device --version` (start-up, imports)",
        "score": "`ecos-device score` (40 images, signed probe)",
        "predict_student": "`ecos-device predict` fp32 (20 images)",
        "predict_student.int8": "`ecos-device predict` int8 (20 images)",
        "features": "encode 40 images (this script, device_sdk)",
    }
    for key, label in labels.items():
        if key in times:
            lines.append(f"| {label} | {times[key][0]} | {times[key][1]} |")
    if v.get("x86_score"):
        wall, rss = v["x86_score"].split()[:2]
        lines.append(f"| for reference, x86 host natively: `ecos-device score`, same inputs | {wall} | {rss} |")
    lines += [
        "",
        "Reproduce: `sudo scripts/check-arm64.sh` (the root is cached in `runs/arm64-root`, the artifacts in",
        "`runs/arm64-check`).",
        "",
    ]
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        f.write("\n".join(lines))
    return 0


def main(argv):
    if argv[:1] == ["--time"]:
        return cmd_time(argv[argv.index("--") + 1 :])
    if argv[:1] == ["--encode"]:
        return cmd_encode(*argv[1:5])
    if argv[:1] == ["--compare"]:
        return cmd_compare(*argv[1:])
    if argv[:1] == ["--round"]:
        return cmd_round(*argv[1:3])
    if argv[:1] == ["--report"]:
        return cmd_report(argv[1], [argv[i + 1] for i, a in enumerate(argv) if a == "--set"])
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
