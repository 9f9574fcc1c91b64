"""ECOS device SDK: runs on the device (Raspberry Pi class).

Light by design: numpy, Pillow, paho-mqtt and one inference runtime. It never imports
torch, torchvision or anything from ``cloud``; the cloud imports the wire protocol from here.

The API an app embeds (docs/sdk.md) is importable from here; each name is loaded on first use,
so ``import device_sdk`` alone stays cheap::

    from device_sdk import DeviceAgent, FrameBuffer, load_device_config
"""

__version__ = "0.1.0"

# public name -> module that defines it (PEP 562 lazy attributes)
_PUBLIC = {
    "DeviceAgent": "device_sdk.agent",
    "AgentEvent": "device_sdk.agent",
    "AgentStats": "device_sdk.agent",
    "EventKind": "device_sdk.agent",
    "ModelInfo": "device_sdk.agent",
    "DataSource": "device_sdk.datasource",
    "FolderSource": "device_sdk.datasource",
    "CallableSource": "device_sdk.datasource",
    "FrameBuffer": "device_sdk.datasource",
    "DeviceConfig": "device_sdk.config",
    "load_device_config": "device_sdk.config",
    "Predictor": "device_sdk.predict",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'device_sdk' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
