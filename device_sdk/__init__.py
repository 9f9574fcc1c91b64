"""ECOS device SDK: runs on the device (Raspberry Pi class).

Light by design: numpy, Pillow, paho-mqtt and one inference runtime. It never imports
torch, torchvision or anything from ``cloud``; the cloud imports the wire protocol from here.
"""

__version__ = "0.1.0"
