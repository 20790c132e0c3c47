"""cdcda-export: personalized on-device LMs from user data to ExecuTorch / ONNX / Core ML artifacts."""

__version__ = "0.1.0"
