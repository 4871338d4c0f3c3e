"""The Encoder's forward passes (torch, torch-bf16, onnx, openvino), how they run side by side, and auto."""
