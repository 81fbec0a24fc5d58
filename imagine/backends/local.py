"""A transformers chat model on this machine: concurrent requests are micro-batched into one ``generate``.

The engine asks for many short completions at once (one per dialogue in flight); a worker collects the
requests that arrive within a few milliseconds, pads them on the left and generates them together in a
worker thread, so the event loop stays free and a 135 M model on a CPU gets batch throughput.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from imagine.backends.base import BackendError, ChatMessages, Usage

logger = logging.getLogger(__name__)

# ChatML, the template of SmolLM2-Instruct; used when a tokenizer has none.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class _Request:
    messages: ChatMessages
    max_tokens: int
    temperature: float
    future: asyncio.Future[str] = field(repr=False)

    @property
    def key(self) -> tuple[int, float]:
        return self.max_tokens, self.temperature


class LocalBackend:
    """A causal LM loaded with transformers (a directory path) or given directly as ``(model, tokenizer)``."""

    name = "local"
    writes_whole_dialogues = False

    def __init__(
        self,
        model: str | Path | tuple[PreTrainedModel, PreTrainedTokenizerBase],
        *,
        model_name: str | None = None,
        max_batch: int = 32,
        batch_window_s: float = 0.01,
        top_k: int = 40,
        repetition_penalty: float = 1.1,
        bf16_autocast: bool = False,
        device: str = "cpu",
        seed: int = 0,
        num_threads: int | None = None,
    ) -> None:
        if num_threads is not None:
            # Process-wide. On a CPU shared with other jobs one thread can be several times faster than
            # two, whose OpenMP workers spin waiting for each other (measured: 8x on an oversubscribed box).
            torch.set_num_threads(num_threads)
        if isinstance(model, tuple):
            self._model, self._tokenizer = model
            self.model = model_name or str(getattr(self._model.config, "name_or_path", "") or "in-memory")
        else:
            path = Path(model).expanduser()
            if not (path / "config.json").is_file():
                raise BackendError(f"{path}: not a model directory (no config.json)")
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(path)
                self._model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            except (OSError, ValueError) as error:
                raise BackendError(f"cannot load a chat model from {path}: {error}") from error
            self.model = model_name or str(path)
        self._model.to(device).eval()
        self._device = device
        if self._tokenizer.chat_template is None:
            self._tokenizer.chat_template = CHATML_TEMPLATE
        if self._tokenizer.pad_token is None:
            self._tokenizer.pad_token = self._tokenizer.eos_token
        self._tokenizer.padding_side = "left"
        self._stop_ids = self._stop_token_ids()
        self.max_batch = max_batch
        self.batch_window_s = batch_window_s
        self.top_k = top_k
        self.repetition_penalty = repetition_penalty
        # Off by default: for batched decoding of a 135 M model the casts cost more than bf16 saves (measured).
        self.bf16_autocast = bf16_autocast
        self.usage = Usage()
        self._seed = seed
        self._batches = 0
        self._queue: asyncio.Queue[_Request] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._closed = False

    def _stop_token_ids(self) -> list[int]:
        ids = {self._tokenizer.eos_token_id}
        im_end = self._tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != self._tokenizer.unk_token_id:
            ids.add(im_end)
        return sorted(i for i in ids if i is not None)

    async def complete(
        self,
        messages: ChatMessages,
        *,
        max_tokens: int = 256,
        temperature: float = 0.8,
        json_mode: bool = False,  # a small local model has no JSON mode; callers parse robustly
    ) -> str:
        """The model's reply; batched with every other request that arrives at about the same time."""
        if self._closed:
            raise BackendError("the local backend is closed")
        if self._queue is None or self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = asyncio.create_task(self._serve(self._queue), name="local-backend-batcher")
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Request(messages, max_tokens, max(temperature, 0.0), future))
        return await future

    async def _serve(self, queue: asyncio.Queue[_Request]) -> None:
        held: list[_Request] = []  # requests with other sampling settings wait for the next batch
        while True:
            first = held.pop(0) if held else await queue.get()
            await asyncio.sleep(self.batch_window_s)  # let concurrent callers join this batch
            batch, rest = [first], []
            for request in [*held, *_drain(queue)]:
                (batch if request.key == first.key and len(batch) < self.max_batch else rest).append(request)
            held = rest
            try:
                texts = await asyncio.to_thread(self.generate_batch, [r.messages for r in batch], *first.key)
            except Exception as error:  # one bad batch fails its requests, never the worker
                self.usage.failures += len(batch)
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(BackendError(f"local generation failed: {error}"))
                continue
            for request, text in zip(batch, texts, strict=True):
                if not request.future.done():
                    request.future.set_result(text)

    def generate_batch(self, conversations: list[ChatMessages], max_tokens: int, temperature: float) -> list[str]:
        """Blocking batched generation: one reply per conversation (runs in a worker thread)."""
        prompts = [
            self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            for messages in conversations
        ]
        encoded = self._tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        encoded = {name: tensor.to(self._device) for name, tensor in encoded.items()}
        self._batches += 1
        torch.manual_seed(self._seed * 100_003 + self._batches)
        sampling: dict[str, Any] = (
            {"do_sample": True, "temperature": temperature, "top_k": self.top_k}
            if temperature > 0
            else {"do_sample": False}
        )
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16_autocast else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            output = self._model.generate(
                **encoded,
                max_new_tokens=max_tokens,
                eos_token_id=self._stop_ids,
                pad_token_id=self._tokenizer.pad_token_id,
                repetition_penalty=self.repetition_penalty,
                **sampling,
            )
        new_tokens = output[:, encoded["input_ids"].shape[1] :]
        self.usage.requests += len(conversations)
        self.usage.prompt_tokens += int(encoded["attention_mask"].sum())
        stop = torch.tensor([*self._stop_ids, self._tokenizer.pad_token_id], device=new_tokens.device)
        self.usage.completion_tokens += int((~torch.isin(new_tokens, stop)).sum())
        return [text.strip() for text in self._tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]

    async def aclose(self) -> None:
        """Stop the batching worker; pending requests fail with :class:`BackendError`."""
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        if self._queue is not None:
            for request in _drain(self._queue):
                if not request.future.done():
                    request.future.set_exception(BackendError("the local backend was closed"))


def _drain(queue: asyncio.Queue[_Request]) -> list[_Request]:
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items
