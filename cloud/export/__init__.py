"""From a trained torch model to device artifacts: ONNX and TFLite files (formats), int8
quantisation (quantize) and the accuracy gate every artifact passes before it ships (gate).
"""
