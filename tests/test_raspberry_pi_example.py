"""examples/raspberry_pi: the install script, the two systemd units, device.toml, README.md and the
camera app must agree (one user, one layout), the units must stay hardened, and the script must
work (run here against a temporary root, as a user, twice)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import stat
import subprocess
import sys
import types
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "raspberry_pi"
INSTALL = EXAMPLE / "install.sh"
UNITS = ("ecos-device.service", "ecos-camera.service")
MAX_EXPOSURE = 4.0


def parse_unit(path: Path) -> Dict[str, Dict[str, List[str]]]:
    """A systemd unit as {section: {key: [values in order]}} (keys may repeat; comments skipped)."""
    sections: Dict[str, Dict[str, List[str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        assert current is not None, f"{path.name}: {line!r} outside a section"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def layout() -> Dict[str, str]:
    """The layout variables at the top of install.sh (NAME=/absolute/path or a word)."""
    found = dict(re.findall(r"^([A-Z_]+)=([A-Za-z0-9_/.-]+)(?:\s|$)", INSTALL.read_text(), re.M))
    keys = (
        "ECOS_USER",
        "ECOS_GROUP",
        "PREFIX",
        "STATE_DIR",
        "WRITABLE_DIR",
        "CAMERA_DIR",
        "ETC_DIR",
        "CREDENTIALS",
        "UNIT_DIR",
    )
    missing = [k for k in keys if k not in found]
    assert not missing, f"install.sh no longer defines {missing}"
    return {k: found[k] for k in keys}


def run_install(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(INSTALL), *args], input=stdin, capture_output=True, text=True, timeout=60)


@pytest.fixture
def cloud_key(tmp_path) -> Path:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = tmp_path / "cloud.pub.pem"
    path.write_bytes(
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return path


@pytest.fixture
def installed(tmp_path, cloud_key) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    result = run_install("--root", str(root), "--device-id", "pi-test", "--cloud-key", str(cloud_key))
    assert result.returncode == 0, result.stdout + result.stderr
    return root


# ---- the units agree with install.sh -------------------------------------------------------------


@pytest.mark.parametrize("unit", UNITS)
def test_unit_runs_as_the_installed_user_with_the_installed_paths(unit):
    lay, service = layout(), parse_unit(EXAMPLE / unit)["Service"]
    assert service["User"] == [lay["ECOS_USER"]] and service["Group"] == [lay["ECOS_GROUP"]]
    assert service["WorkingDirectory"] == [lay["STATE_DIR"]]
    assert service["EnvironmentFile"] == ["-" + lay["CREDENTIALS"]]
    exec_start = service["ExecStart"][0].split()
    assert exec_start[0].startswith(lay["PREFIX"] + "/venv/bin/"), exec_start
    assert exec_start[exec_start.index("--config") + 1] == lay["STATE_DIR"] + "/device.toml"
    for arg in exec_start[1:]:  # every absolute path it names is one install.sh makes
        if arg.startswith("/"):
            assert arg.startswith((lay["PREFIX"] + "/", lay["STATE_DIR"] + "/")), arg
    writable = " ".join(service["ReadWritePaths"]).split()
    assert lay["WRITABLE_DIR"] in writable and set(writable) <= {lay["WRITABLE_DIR"], lay["CAMERA_DIR"]}


@pytest.mark.parametrize("unit", UNITS)
def test_unit_waits_for_the_clock_and_is_bounded(unit):
    sections = parse_unit(EXAMPLE / unit)
    for key in ("After", "Wants"):
        assert "time-sync.target" in " ".join(sections["Unit"][key]).split(), key
    service = sections["Service"]
    assert re.fullmatch(r"\d+[KMG]", service["MemoryMax"][0])
    assert service["NoNewPrivileges"] == ["true"] and service["ProtectSystem"] == ["strict"]
    other = next(u for u in UNITS if u != unit)
    assert other in sections["Unit"]["Conflicts"], "agent and app share a device id and a ledger: one at a time"


def test_agent_unit_uses_the_watchdog_the_agent_feeds():
    service = parse_unit(EXAMPLE / "ecos-device.service")["Service"]
    assert service["Type"] == ["notify"] and service["NotifyAccess"] == ["main"]
    assert int(service["WatchdogSec"][0]) >= 10
    assert service["ExecStart"][0].split()[0].endswith("/ecos-device")  # device_sdk.cli run notifies (test_sdnotify)


def test_camera_unit_runs_the_installed_app_and_writes_where_it_saves():
    lay = layout()
    exec_start = parse_unit(EXAMPLE / "ecos-camera.service")["Service"]["ExecStart"][0].split()
    assert exec_start[1] == lay["PREFIX"] + "/app.py"
    assert exec_start[exec_start.index("--save-to") + 1] == lay["CAMERA_DIR"]


def _exposure(unit: Path) -> float:
    out = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out.stdout + out.stderr)
    assert match, out.stdout[-2000:] + out.stderr[-2000:]
    return float(match.group(1))


@pytest.mark.parametrize("unit", UNITS)
def test_unit_is_hardened(unit):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    probe = subprocess.run(["systemd-analyze", "security", "--help"], capture_output=True, text=True)
    if "--offline" not in probe.stdout:
        pytest.skip("this systemd-analyze has no --offline (systemd < 250)")
    assert _exposure(EXAMPLE / unit) <= MAX_EXPOSURE


def test_exposure_check_can_fail(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    bare = tmp_path / "bare.service"
    bare.write_text("[Service]\nExecStart=/bin/true\n")
    assert _exposure(bare) > MAX_EXPOSURE


# ---- README, device.toml and install.sh agree ----------------------------------------------------


def test_readme_uses_the_same_layout_and_commands():
    lay, readme = layout(), (EXAMPLE / "README.md").read_text()
    for path in (
        lay["PREFIX"] + "/venv/bin/ecos-device",
        lay["STATE_DIR"] + "/device.toml",
        lay["CREDENTIALS"],
        lay["WRITABLE_DIR"] + "/ledger.json",
    ):
        assert path in readme, path
    assert "install.sh" in readme and "../../docs/results/pi.md" in readme
    assert "~/ecos" not in readme and "/home/ecos" not in readme
    for option in re.findall(r"install\.sh((?: --[a-z-]+)+)", readme):  # options the README shows exist
        for name in option.split():
            assert f"  {name}" in INSTALL.read_text(), name
    for unit in UNITS:
        assert unit in readme


def test_installed_device_toml_resolves_into_the_layout(installed):
    from device_sdk.config import load_device_config

    lay = layout()
    cfg = load_device_config(str(installed / lay["STATE_DIR"].lstrip("/") / "device.toml"), env={})
    assert cfg.device_id == "pi-test"
    writable = str(installed) + lay["WRITABLE_DIR"]
    assert cfg.privacy.ledger.startswith(writable + "/") and cfg.models.store.startswith(writable + "/")
    assert os.path.isdir(cfg.data.local) and os.path.isdir(installed / lay["CAMERA_DIR"].lstrip("/"))
    assert cfg.data.local in str(installed) + lay["CAMERA_DIR"]
    assert os.path.isfile(cfg.models.cloud_public_key)
    for unit in UNITS:
        for path in " ".join(parse_unit(EXAMPLE / unit)["Service"]["ReadWritePaths"]).split():
            assert (installed / path.lstrip("/")).is_dir(), f"{unit}: ReadWritePaths={path} would fail to start"


# ---- install.sh works ----------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_install_sets_safe_modes(installed):
    lay = layout()
    at = lambda p: installed / p.lstrip("/")  # noqa: E731
    assert _mode(at(lay["CREDENTIALS"])) == 0o600
    assert _mode(at(lay["WRITABLE_DIR"])) == 0o700 and _mode(at(lay["CAMERA_DIR"])) == 0o700
    assert _mode(at(lay["STATE_DIR"] + "/device.toml")) == 0o640
    assert _mode(at(lay["ETC_DIR"])) == 0o750
    for unit in UNITS:
        assert at(lay["UNIT_DIR"] + "/" + unit).read_text() == (EXAMPLE / unit).read_text()
    assert at(lay["PREFIX"] + "/app.py").read_text() == (EXAMPLE / "app.py").read_text()
    assert not at(lay["PREFIX"] + "/venv").exists()  # --root implies --no-venv


def test_install_is_idempotent_and_keeps_what_the_user_edited(installed):
    lay = layout()
    config = installed / lay["STATE_DIR"].lstrip("/") / "device.toml"
    creds = installed / lay["CREDENTIALS"].lstrip("/")
    config.write_text(config.read_text().replace('host = "127.0.0.1"', 'host = "broker.lan"'))
    creds.write_text("ECOS_DEVICE_BROKER_PASSWORD='kept'\n")
    creds.chmod(0o644)  # a mistake the next run repairs
    again = run_install("--root", str(installed), "--device-id", "other")
    assert again.returncode == 0, again.stderr
    assert 'host = "broker.lan"' in config.read_text() and 'device_id = "pi-test"' in config.read_text()
    assert creds.read_text() == "ECOS_DEVICE_BROKER_PASSWORD='kept'\n" and _mode(creds) == 0o600


def test_install_password_stdin_writes_only_the_credentials_file(installed):
    lay = layout()
    result = run_install("--root", str(installed), "--password-stdin", stdin="s3cret-pw\n")
    assert result.returncode == 0, result.stderr
    creds = installed / lay["CREDENTIALS"].lstrip("/")
    assert "ECOS_DEVICE_BROKER_PASSWORD='s3cret-pw'" in creds.read_text() and _mode(creds) == 0o600
    assert "s3cret-pw" not in result.stdout + result.stderr
    assert "s3cret-pw" not in (installed / lay["STATE_DIR"].lstrip("/") / "device.toml").read_text()


def test_install_dry_run_changes_nothing(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    result = run_install("--root", str(root), "--dry-run", "--device-id", "pi-test")
    assert result.returncode == 0, result.stderr
    assert list(root.iterdir()) == []
    assert "install -d -m 0700" in result.stdout  # it says what it would do


def test_install_help_and_bad_arguments(tmp_path):
    help_ = run_install("--help")
    assert help_.returncode == 0 and "--root DIR" in help_.stdout and "--wheel PATH" in help_.stdout
    for args, code in (
        (["--bogus"], 2),
        (["--root", str(tmp_path), "--extra", "cuda"], 1),
        (["--root", str(tmp_path), "--device-id", "bad id"], 1),
        (["--root", str(tmp_path / "missing")], 1),
        (["--root", str(tmp_path), "--wheel", str(tmp_path / "none.whl")], 1),
    ):
        result = run_install(*args)
        assert result.returncode == code, (args, result.stdout, result.stderr)
    assert not (tmp_path / "opt").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="checks the refusal a normal user gets")
def test_install_without_root_refuses_a_real_install():
    result = run_install()
    assert result.returncode == 1 and "as root" in result.stderr


# ---- the camera app --------------------------------------------------------------------------------


def _app():
    spec = importlib.util.spec_from_file_location("ecos_example_app", EXAMPLE / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def image_folder(tmp_path) -> Path:
    from PIL import Image

    folder = tmp_path / "local"
    folder.mkdir()
    for i, color in enumerate(((255, 0, 0), (0, 255, 0), (0, 0, 255))):
        Image.new("RGB", (40, 30), color).save(folder / f"{i}.png")
    return folder


def test_camera_auto_falls_back_to_the_folder_without_camera_modules(image_folder):
    app = _app()
    camera = app.open_camera("auto", folder=str(image_folder), importer=lambda name: None)
    assert camera.name == "folder"
    frames = [camera.read() for _ in range(4)]
    assert [tuple(f[0, 0]) for f in frames] == [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 0, 0)]
    assert frames[0].shape == (30, 40, 3) and frames[0].dtype == np.uint8
    batch = app.to_model_input(frames[:2], (32, 32))
    assert batch.shape == (2, 32, 32, 3) and tuple(batch[1, 5, 5]) == (0, 255, 0)


def test_camera_errors_are_typed(image_folder):
    from device_sdk.errors import InputError

    app = _app()
    with pytest.raises(InputError, match="picamera2: not installed"):
        app.open_camera("picamera2", folder=str(image_folder), importer=lambda name: None)
    with pytest.raises(InputError, match="unknown camera"):
        app.open_camera("webcam")


class _FakeCapture:
    """cv2.VideoCapture's interface over fixed BGR frames (there is no camera on the test machine)."""

    def __init__(self, source):
        self.source, self.frames = source, [np.full((6, 8, 3), (10, 20, 30), np.uint8)]

    def isOpened(self):  # noqa: N802 - OpenCV's name
        return self.source != 7

    def read(self):
        return (True, self.frames.pop()) if self.frames else (False, None)

    def release(self):
        pass


def test_camera_opencv_frames_are_converted_from_bgr(image_folder):
    from device_sdk.errors import InputError

    app = _app()
    fake_cv2 = types.SimpleNamespace(VideoCapture=_FakeCapture)
    camera = app.open_camera(
        "auto", source="0", folder=str(image_folder), importer=lambda name: fake_cv2 if name == "cv2" else None
    )
    assert camera.name == "opencv" and camera._cap.source == 0
    assert tuple(camera.read()[0, 0]) == (30, 20, 10)
    with pytest.raises(InputError, match="no frame"):
        camera.read()
    fallback = app.open_camera(
        "auto", source="7", folder=str(image_folder), importer=lambda n: fake_cv2 if n == "cv2" else None
    )
    assert fallback.name == "folder"  # index 7 does not open: on to the folder


def test_camera_picamera2_is_asked_for_rgb_ordered_frames():
    app = _app()
    calls = {}

    class FakePicamera2:
        def create_still_configuration(self, main):
            calls["main"] = main
            return main

        def configure(self, config):
            pass

        def start(self):
            pass

        def capture_array(self, stream):
            return np.zeros((480, 640, 4), np.uint8)

        def stop(self):
            calls["stopped"] = True

        def close(self):
            pass

    camera = app.open_camera("picamera2", importer=lambda name: types.SimpleNamespace(Picamera2=FakePicamera2))
    assert calls["main"] == {"size": (640, 480), "format": "BGR888"}  # picamera2's BGR888 is R, G, B in memory
    assert camera.read().shape == (480, 640, 3)
    camera.close()
    assert calls["stopped"]


def test_camera_opencv_reads_a_real_video_file(tmp_path, image_folder):
    cv2 = pytest.importorskip("cv2")
    app = _app()
    path = str(tmp_path / "clip.avi")
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), 5, (40, 30))
    for _ in range(3):
        writer.write(np.full((30, 40, 3), (0, 0, 255), np.uint8))  # BGR red
    writer.release()
    camera = app.open_camera("opencv", source=path, folder=str(image_folder))
    frame = camera.read()
    assert frame.shape == (30, 40, 3) and frame[15, 20, 0] > 200 and frame[15, 20, 2] < 60  # RGB red


def test_save_frame_keeps_pngs_up_to_the_limit(tmp_path):
    app = _app()
    frame = np.full((12, 16, 3), 77, np.uint8)
    kept = [app.save_frame(frame, str(tmp_path / "camera"), limit=2) for _ in range(3)]
    assert kept[0] and kept[1] and kept[2] is None
    assert sorted(os.listdir(tmp_path / "camera")) == sorted(os.path.basename(p) for p in kept[:2])


def test_app_help_runs():
    result = subprocess.run(
        [sys.executable, str(EXAMPLE / "app.py"), "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "--camera" in result.stdout
