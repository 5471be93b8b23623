"""Serving: many LoRA adapters over one base model in mixed batches, generation, the HTTP server."""
from .bank import AdapterBank
from .generate import GenerationRequest, GenerationResult
from .scheduler import RunningBatch, generate_batch

__all__ = ["AdapterBank", "GenerationRequest", "GenerationResult", "RunningBatch", "generate_batch"]
