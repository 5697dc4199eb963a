"""Inference: KV-cache generation (`engine`), the calculator tool (`calculator`), what the chat front
ends share (`chat`), continuous batching (`batching`), the OpenAI request format (`openai_api`) and the
server app (`web`, imported on its own: it needs FastAPI)."""

from ghostvis.infer.calculator import CalculatorError, calculate
from ghostvis.infer.engine import Completion, Engine, TokenEvent

__all__ = ["CalculatorError", "Completion", "Engine", "TokenEvent", "calculate"]
