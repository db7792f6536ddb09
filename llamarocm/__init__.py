"""Run GGUF language models on AMD GPUs through llama.cpp's ``llama-server``.

>>> import llamarocm
>>> with llamarocm.load_model("gemma.gguf") as model:  # doctest: +SKIP
...     for token in model.generate("Once upon a time", max_tokens=32):
...         print(token.text, end="", flush=True)
"""

from __future__ import annotations

import logging

from . import errors
from .act import ActResult
from .batch import BatchResult
from .config import GenerateConfig, LoadConfig
from .devices import GPUDevice, VRAMInfo, check_fits, list_devices, vram_info
from .errors import *  # noqa: F403 - the whole tree, as errors.__all__ lists it
from .gguf import GGUFMetadata, ModelInfo, discover_models, read_metadata
from .loading import connect, load_model
from .model import Model
from .pool import ModelPool
from .rpc import RpcWorker
from .server import Server
from .session import ChatSession
from .stream import GenerateMetrics, Token, TokenStream, TopLogprob
from .tools import ToolCall

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "load_model",
    "connect",
    "Model",
    "ModelPool",
    "ChatSession",
    "TokenStream",
    "Token",
    "TopLogprob",
    "ToolCall",
    "ActResult",
    "GenerateMetrics",
    "BatchResult",
    "Server",
    "RpcWorker",
    "vram_info",
    "list_devices",
    "check_fits",
    "VRAMInfo",
    "GPUDevice",
    "GenerateConfig",
    "LoadConfig",
    "read_metadata",
    "discover_models",
    "GGUFMetadata",
    "ModelInfo",
]
__all__ += errors.__all__

# A library never configures logging; this only keeps "no handler" warnings away.
logging.getLogger("llamarocm").addHandler(logging.NullHandler())
