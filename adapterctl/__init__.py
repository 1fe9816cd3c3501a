"""adapterctl: deploy LoRA adapters to inference endpoints, safely and reversibly."""

__version__ = "0.1.0"
