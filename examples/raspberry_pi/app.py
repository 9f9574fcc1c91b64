"""A device app that embeds the ECOS SDK: a camera loop that classifies with the installed model.

The agent runs in the background (answering the cloud's probes within the privacy budget,
installing signed models); the app asks it for predictions and reacts to its events. Replace
``capture()`` with your camera or sensor.

    python app.py --config device.toml
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading

import numpy as np

from device_sdk.agent import AgentEvent, DeviceAgent
from device_sdk.config import load_device_config
from device_sdk.imagefolder import load_images, scan_image_folder

LOG = logging.getLogger("app")


def capture(config, size, count: int = 4) -> np.ndarray:
    """Stand-in for a camera: a few images from the local folder, as uint8 N x H x W x 3."""
    items = scan_image_folder(config.data.local)[:count]
    return load_images([it.path for it in items], size)


def on_event(event: AgentEvent) -> None:
    if event.kind == "installed":
        LOG.info("new model %s v%s installed (accuracy on local test data: %s)", event.detail["artifact_id"],
                 event.detail["version"], event.detail["accuracy"])
    elif event.kind in ("probe_refused", "install_failed"):
        LOG.warning("%s: %s", event.kind, event.detail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="device.toml")
    parser.add_argument("--every", type=float, default=10.0, help="seconds between captures")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    config = load_device_config(args.config)
    agent = DeviceAgent(config, on_event=on_event).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        while not stop.wait(args.every):
            model = agent.model("classifier")
            if model is None:  # no model yet: the cloud ships one after a round
                LOG.info("waiting for the first model")
                continue
            LOG.info("prediction: %s", agent.predict(capture(config, model.meta.image_size)))
    finally:
        agent.stop()


if __name__ == "__main__":
    main()
