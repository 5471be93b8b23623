"""lorakit: LoRA / DoRA / rsLoRA adapters for any PyTorch model, in PEFT's format and API."""
from .config import LoraConfig, TaskType
from .inject import LoraModel
from .layers import LoraConv2d, LoraEmbedding, LoraLayer, LoraLinear
from .peft_api import PeftModel, get_peft_model

__version__ = "0.1.0"
__all__ = ["LoraConfig", "TaskType", "LoraModel", "PeftModel", "get_peft_model",
           "LoraLayer", "LoraLinear", "LoraEmbedding", "LoraConv2d"]
