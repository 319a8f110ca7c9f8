"""The baseline: the streaming completions server a user would write by hand with transformers
and PEFT, to see what Lamina's engine buys over it.

    python bench/serve/hf_server.py --model DIR --port 8100 [--adapter NAME=PATH ...]

``POST /v1/completions`` (streamed, OpenAI's event shape, usage chunk at the end) runs
``model.generate`` with a ``TextIteratorStreamer`` in a thread, one request at a time behind a
lock: plain ``generate`` cannot batch requests that arrive at different times, so concurrent
clients queue. ``model`` is ``base`` (adapters disabled) or the name of an ``--adapter``
(a PEFT directory, e.g. a task from Lamina's store). ``GET /ready`` answers once loaded. It runs
on ``--device`` (CUDA when there is one, in bfloat16; else the CPU in float32).
Deliberately minimal: it is a reference point, not a product.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionRequest(BaseModel):
    model: str
    prompt: str
    max_tokens: int = 16
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens
    temperature: float = 1.0
    seed: int | None = None
    stream: bool = True
    stream_options: StreamOptions | None = None


class Generator:
    """One model (optionally with named PEFT adapters) and the lock that serializes it."""

    def __init__(self, model_dir: str, adapters: dict[str, str], device: str) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
        if adapters:
            from peft import PeftModel

            (first, path), *rest = adapters.items()
            model = PeftModel.from_pretrained(model, path, adapter_name=first)
            for name, path in rest:
                model.load_adapter(path, adapter_name=name)
        self.model = model.eval()
        self.adapters = set(adapters)
        self.lock = asyncio.Lock()

    @contextlib.contextmanager
    def _use(self, name: str) -> Iterator[None]:
        """``base``: every adapter off; an adapter name: that adapter on."""
        if name == "base":
            with self.model.disable_adapter() if self.adapters else contextlib.nullcontext():
                yield
            return
        if name not in self.adapters:
            raise KeyError(name)
        self.model.set_adapter(name)
        yield

    async def stream(self, request: CompletionRequest) -> AsyncIterator[tuple[str, int | None]]:
        """Yield (text, None) pieces as they decode, then ("", completion tokens)."""
        async with self.lock:
            inputs = self.tokenizer(request.prompt, return_tensors="pt").to(self.model.device)
            streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
            produced: dict[str, torch.Tensor] = {}

            def run() -> None:
                if request.seed is not None:
                    torch.manual_seed(request.seed)
                with self._use(request.model), torch.inference_mode():
                    produced["ids"] = self.model.generate(
                        **inputs,
                        streamer=streamer,
                        max_new_tokens=request.max_tokens,
                        min_new_tokens=request.max_tokens if request.ignore_eos else None,
                        do_sample=request.temperature > 0,
                        temperature=request.temperature if request.temperature > 0 else None,
                        pad_token_id=self.tokenizer.pad_token_id,
                    )

            thread = threading.Thread(target=run, daemon=True)
            thread.start()
            try:
                pieces = iter(streamer)
                while (text := await asyncio.to_thread(next, pieces, None)) is not None:
                    if text:
                        yield text, None
            finally:
                await asyncio.to_thread(thread.join)
            ids = produced.get("ids")
            yield "", (int(ids.shape[1] - inputs["input_ids"].shape[1]) if ids is not None else 0)


def create_app(generator: Generator) -> FastAPI:
    app = FastAPI(title="transformers + PEFT baseline")

    @app.get("/ready")
    async def ready() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest) -> Any:
        if request.model != "base" and request.model not in generator.adapters:
            return JSONResponse(status_code=404, content={"error": {"message": f"no model {request.model}"}})
        return StreamingResponse(_events(generator, request), media_type="text/event-stream")

    return app


async def _events(generator: Generator, request: CompletionRequest) -> AsyncIterator[str]:
    response_id, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    prompt_tokens = len(generator.tokenizer(request.prompt)["input_ids"])

    def event(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        body: dict[str, Any] = {
            "id": response_id,
            "object": "text_completion",
            "created": created,
            "model": request.model,
            "system_fingerprint": request.model,
            "choices": choices,
        }
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    async for text, tokens in generator.stream(request):
        if tokens is None:
            yield event([{"index": 0, "text": text, "logprobs": None, "finish_reason": None}])
        elif request.stream_options and request.stream_options.include_usage:
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": tokens,
                "total_tokens": prompt_tokens + tokens,
            }
            yield event([], usage)
    yield "data: [DONE]\n\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="Base model directory (Hugging Face layout).")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--adapter", action="append", default=[], help="NAME=PEFT_DIR; repeatable.")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    adapters = dict(item.split("=", 1) for item in args.adapter)
    uvicorn.run(
        create_app(Generator(args.model, adapters, args.device)),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
