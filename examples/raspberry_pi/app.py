"""A device app that embeds the ECOS SDK: a camera loop that classifies with the installed model.

The agent runs in the background (answering the cloud's probes within the privacy budget,
installing signed models); the app captures a frame every few seconds, asks the agent for a
prediction and reacts to its events. It can also keep frames in the device's local image folder,
the private data the agent scores against the cloud's probes (frames never leave the device).

Camera sources (``--camera``; all optional imports, none is a dependency of ecos-fleet-device):
``picamera2`` (Raspberry Pi camera; on Pi OS ``sudo apt install python3-picamera2`` and a venv
made with ``--system-site-packages``), ``opencv`` (``cv2.VideoCapture``: a USB webcam, or a
video file or stream URL given as ``--source``; ``pip install opencv-python-headless``), and
``folder`` (cycles through the images of a folder: no camera needed). ``auto`` (the default)
takes the first of these that is importable and opens.

    python app.py --config device.toml [--camera auto] [--every 10] [--save-to data/local/camera]
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import threading
import time
from typing import Callable, List, Optional, Tuple

import numpy as np

from device_sdk.agent import AgentEvent, DeviceAgent
from device_sdk.config import load_device_config
from device_sdk.errors import InputError
from device_sdk.imagefolder import load_image, scan_image_folder

LOG = logging.getLogger("app")
CAMERAS = ("auto", "picamera2", "opencv", "folder")


def _optional_import(name: str):
    """The module, or None when it is not installed (or fails to import: a broken camera stack)."""
    try:
        return importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - ImportError, or whatever a half-installed native module raises
        LOG.debug("%s not usable: %s: %s", name, exc.__class__.__name__, exc)
        return None


class Picamera2Source:
    """The Raspberry Pi camera through picamera2 (libcamera)."""

    name = "picamera2"

    def __init__(self, module, size: Tuple[int, int] = (480, 640)):
        self._cam = module.Picamera2()
        # picamera2 names formats by their little-endian word: "BGR888" is laid out R, G, B in memory.
        config = self._cam.create_still_configuration(main={"size": (size[1], size[0]), "format": "BGR888"})
        self._cam.configure(config)
        self._cam.start()

    def read(self) -> np.ndarray:
        return np.ascontiguousarray(self._cam.capture_array("main")[..., :3])

    def close(self) -> None:
        self._cam.stop()
        self._cam.close()


class OpenCVSource:
    """A camera index (``0`` = /dev/video0), a video file or a stream URL through cv2.VideoCapture."""

    name = "opencv"

    def __init__(self, module, source: str = "0"):
        self._cap = module.VideoCapture(int(source) if source.isdigit() else source)
        if not self._cap.isOpened():
            self._cap.release()
            raise InputError(f"OpenCV could not open video source {source!r}")
        self._source = source

    def read(self) -> np.ndarray:
        ok, frame = self._cap.read()
        if not ok or frame is None:
            raise InputError(f"no frame from video source {self._source!r}")
        if frame.ndim == 2:  # a grey camera
            frame = np.repeat(frame[:, :, None], 3, axis=2)
        return np.ascontiguousarray(frame[:, :, 2::-1])  # OpenCV frames are BGR

    def close(self) -> None:
        self._cap.release()


class FolderSource:
    """No camera: the images of a folder, one per read, round and round (sorted order)."""

    name = "folder"

    def __init__(self, folder: str):
        self._paths = [item.path for item in scan_image_folder(folder)]
        self._next = 0

    def read(self) -> np.ndarray:
        path = self._paths[self._next % len(self._paths)]
        self._next += 1
        from PIL import Image

        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)

    def close(self) -> None:
        pass


def open_camera(
    kind: str = "auto",
    *,
    source: str = "0",
    folder: Optional[str] = None,
    importer: Callable[[str], object] = _optional_import,
):
    """Open the camera ``kind``; ``auto`` tries picamera2, then OpenCV, then the folder."""
    if kind not in CAMERAS:
        raise InputError(f"unknown camera {kind!r}; one of {', '.join(CAMERAS)}")
    errors: List[str] = []
    if kind in ("auto", "picamera2"):
        module = importer("picamera2")
        if module is not None:
            try:
                return Picamera2Source(module)
            except Exception as exc:  # noqa: BLE001 - no camera attached, camera busy, libcamera errors
                errors.append(f"picamera2: {exc.__class__.__name__}: {exc}")
        else:
            errors.append("picamera2: not installed")
    if kind in ("auto", "opencv"):
        module = importer("cv2")
        if module is not None:
            try:
                return OpenCVSource(module, source)
            except Exception as exc:  # noqa: BLE001
                errors.append(f"opencv: {exc.__class__.__name__}: {exc}")
        else:
            errors.append("opencv: not installed")
    if kind in ("auto", "folder") and folder is not None:
        return FolderSource(folder)
    raise InputError(f"no camera could be opened ({'; '.join(errors) or 'no folder given'})")


def to_model_input(frames: List[np.ndarray], size: Tuple[int, int]) -> np.ndarray:
    """RGB frames of any size -> uint8 N x H x W x 3 at the model's ``(height, width)``."""
    from PIL import Image

    out = np.empty((len(frames), size[0], size[1], 3), dtype=np.uint8)
    for i, frame in enumerate(frames):
        image = Image.fromarray(frame)
        if (image.height, image.width) != tuple(size):
            image = image.resize((size[1], size[0]), Image.BILINEAR)
        out[i] = np.asarray(image, dtype=np.uint8)
    return out


def save_frame(frame: np.ndarray, folder: str, limit: int) -> Optional[str]:
    """Keep ``frame`` as a PNG in ``folder`` (the agent's local images) while it holds fewer than ``limit``."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    if sum(1 for name in os.listdir(folder) if name.endswith(".png")) >= limit:
        return None
    path = os.path.join(folder, f"{time.strftime('%Y%m%d-%H%M%S')}-{time.monotonic_ns() % 1000000:06d}.png")
    Image.fromarray(frame).save(path + ".tmp", format="PNG")
    os.replace(path + ".tmp", path)
    load_image(path, frame.shape[:2])  # fail here, not in the next probe, if the disk wrote garbage
    return path


def on_event(event: AgentEvent) -> None:
    if event.kind == "installed":
        LOG.info(
            "new model %s v%s installed (accuracy on local test data: %s)",
            event.detail["artifact_id"],
            event.detail["version"],
            event.detail["accuracy"],
        )
    elif event.kind in ("probe_refused", "install_failed"):
        LOG.warning("%s: %s", event.kind, event.detail)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="device.toml")
    parser.add_argument("--every", type=float, default=10.0, help="seconds between captures (default 10)")
    parser.add_argument(
        "--camera",
        choices=CAMERAS,
        default="auto",
        help="picamera2, opencv, folder ([data] local of the config), or auto: the first that works",
    )
    parser.add_argument("--source", default="0", help="OpenCV: camera index, video file or stream URL (default 0)")
    parser.add_argument(
        "--save-to",
        metavar="DIR",
        help="keep captured frames here as PNG, e.g. a folder under "
        "[data] local (the agent scores them; they never leave)",
    )
    parser.add_argument("--save-max", type=int, default=1000, help="stop keeping frames once DIR holds this many")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    config = load_device_config(args.config)
    camera = open_camera(args.camera, source=args.source, folder=config.data.local)
    LOG.info("camera: %s", camera.name)
    agent = DeviceAgent(config, on_event=on_event).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        while not stop.wait(args.every):
            try:
                frame = camera.read()
            except InputError as err:  # a camera that stops delivering: log, try again next time
                LOG.warning("capture failed: %s", err)
                continue
            if args.save_to and save_frame(frame, args.save_to, args.save_max):
                LOG.debug("kept a frame in %s", args.save_to)
            model = agent.model("classifier")
            if model is None:  # no model yet: the cloud ships one after a round
                LOG.info("waiting for the first model")
                continue
            LOG.info("prediction: %s", agent.predict(to_model_input([frame], model.meta.image_size)))
    finally:
        agent.stop()
        camera.close()


if __name__ == "__main__":
    main()
