"""Former home of the protocol's messages, kept so that code written against it still imports.

The messages now live in ``round``, ``delivery`` and ``control``, their schema machinery in
``schema``, topics and bounds in ``topics`` and decoding in ``routing``; new code imports them from
the package: ``from device_sdk.protocol import Ack, inbox, decode_message``.
"""

from device_sdk.protocol import *  # noqa: F403
from device_sdk.protocol import __all__  # noqa: F401
