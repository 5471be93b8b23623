"""lorakit: LoRA / DoRA / rsLoRA adapters for any PyTorch model, in PEFT's format and API."""
from lorakit.config import LoraConfig, TaskType
from lorakit.lora.layers import LoraConv2d, LoraEmbedding, LoraLayer, LoraLinear
from lorakit.model.lora_model import LoraModel
from lorakit.model.peft_model import PeftModel, get_peft_model

__version__ = "0.1.0"
__all__ = ["LoraConfig", "TaskType", "LoraModel", "PeftModel", "get_peft_model",
           "LoraLayer", "LoraLinear", "LoraEmbedding", "LoraConv2d"]
