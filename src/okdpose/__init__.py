"""okdpose: multi-output HRNet with online knowledge distillation between stages."""

__version__ = "0.1.0"
