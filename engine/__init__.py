"""The engine: scheduler, page allocator, model runner, sampling, tokenization, and the offline `LLM` API."""

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.llm import LLM
from engine.params import CompletionOutput, Logprob, RequestOutput, SamplingParams

__all__ = ["LLM", "CompletionOutput", "EngineConfig", "LLMEngine", "Logprob", "RequestOutput", "SamplingParams"]
