"""The wire protocol shared by the device and the cloud.

envelope (the binary ECOS v1 envelope and bounded JSON parsing), round (the probe and scores of an
ECOS round) and messages (topics, limits, and the delivery/status/key messages).
"""
