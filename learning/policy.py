"""The policy the bot, the evaluator and the benchmarks talk to: a history in, one agent reply out.

:func:`load_policy` returns a :class:`LearnedPolicy` for

* ``"base"`` — the untrained base model prompted with ``task.system_prompt``;
* a BC / filtered-BC checkpoint — the LoRA policy, plain sampling (β = 0);
* a token-level ILQL checkpoint — ILQL-guided decoding, ``log π + β·(Q̄ − V)`` over the top-k tokens;
* an utterance-level ILQL checkpoint — K sampled replies reranked by ``Q̄(s, u) − V(s)``.

``respond_batch`` is synchronous and batched; ``respond`` is awaitable and never blocks the event loop. Where
the model is one :mod:`learning.engine` computes (Llama architecture on the CPU: SmolLM2, the tiny test model),
both go through its continuous batching: concurrent chats share one running batch that a chat joins at the
next decode step and leaves as soon as its reply ends, and a conversation's next turn reuses the cached keys and
values of its previous turns. Other models fall back to :func:`learning.decoding.decode` behind a
:class:`MicroBatcher` (requests gathered for a few milliseconds into one batched generate).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from imagine.task import TaskSpec
from learning.base_model import BaseModelError, load_base_model
from learning.checkpoint import HEADS_FILE, CheckpointError, check_base_model, load_manifest, verify_checkpoint
from learning.dataset import ROLE_NAMES, clean_text, end_of_turn_id
from learning.decoding import DecodeConfig, decode, rerank_utterances
from learning.devices import resolve_device
from learning.engine import DecodeEngine, GenerationRequest, engine_supports
from learning.ilql import ILQLConfig, ValueHeads
from learning.interface import DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE, DEFAULT_TOP_K, History, Message
from learning.lora import load_lora
from learning.notes import with_notes

logger = logging.getLogger(__name__)

FALLBACK_REPLY = "Could you tell me a little more about what you are looking for?"


class PolicyLoadError(RuntimeError):
    """A policy cannot be loaded: missing directory, corrupt checkpoint, or a mismatched base model."""


@dataclass
class _Request:
    history: History
    future: asyncio.Future[str]
    loop: asyncio.AbstractEventLoop


def _use_threads(threads: int | None) -> int:
    """Size the calling thread's torch pool to ``threads`` (``None``: leave it) and return its size. OpenMP and
    MKL keep their sizes per calling thread, so the worker that decodes sizes its own."""
    if threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


class MicroBatcher:
    """Gathers concurrent single requests for ``window_ms`` (up to ``max_batch``) into one batched call.

    One worker thread runs ``batch_fn``; results go back to each caller's event loop. A failing batch fails
    only its own requests.
    """

    def __init__(
        self,
        batch_fn: Callable[[list[History]], list[str]],
        *,
        window_ms: float = 5.0,
        max_batch: int = 16,
        threads: int | None = None,
    ) -> None:
        self._batch_fn = batch_fn
        #: threads the worker computes with (read before every batch; ``None``: torch's setting as inherited)
        self.threads = threads
        #: the thread count the worker's last batch ran with (0 before the first)
        self.worker_threads = 0
        self._window = window_ms / 1000.0
        self._max_batch = max_batch
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._lock = threading.Lock()
        #: how many batched calls and single requests have been served (for logs and tests)
        self.batches_served = 0
        self.requests_served = 0

    async def submit(self, history: History) -> str:
        """Queue one history and await its reply."""
        if self._closed:
            raise RuntimeError("policy is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str] = loop.create_future()
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="policy-batcher", daemon=True)
                self._thread.start()
        self._queue.put(_Request(history, future, loop))
        return await future

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            try:
                deadline_item = self._queue.get(timeout=self._window)
                while deadline_item is not None:
                    batch.append(deadline_item)
                    if len(batch) >= self._max_batch:
                        break
                    deadline_item = self._queue.get(timeout=self._window)
                if deadline_item is None:
                    self._queue.put(None)
            except queue.Empty:
                pass
            # A caller that gave up (a timeout cancelled its future) gets no reply: skip its work, so later
            # requests do not queue behind generations nobody waits for.
            batch = [request for request in batch if not request.future.done()]
            if not batch:
                continue
            self.batches_served += 1
            self.requests_served += len(batch)
            try:
                self.worker_threads = _use_threads(self.threads)
                replies = self._batch_fn([r.history for r in batch])
                outcomes: list[tuple[str | None, BaseException | None]] = [(text, None) for text in replies]
            except Exception as error:  # one bad batch must not kill the worker
                logger.exception("policy batch failed")
                outcomes = [(None, error)] * len(batch)
            for request, (text, error) in zip(batch, outcomes, strict=True):
                request.loop.call_soon_threadsafe(_settle, request.future, text, error)

    def close(self) -> None:
        """Stop the worker after the requests already queued."""
        self._closed = True
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30)


class ContinuousBatcher:
    """Serves concurrent single requests from one running batch of a :class:`~learning.engine.DecodeEngine`.

    Unlike :class:`MicroBatcher` nobody waits for the longest reply of a batch: a request joins the running
    batch at the next decode step (an idle batch first gathers for ``window_ms``, as the micro-batcher does),
    and leaves it, with its reply delivered, the step its reply ends. A request whose caller gave up (its
    future is done) is skipped before it joins and dropped from the batch if it already did. The batch holds
    at most the engine's ``max_rows`` rows within its memory bound; later requests wait in order.
    """

    def __init__(
        self,
        engine: DecodeEngine,
        prompt_fn: Callable[[History], list[int]],
        text_fn: Callable[[list[int]], str],
        *,
        should_stop: Callable[[], bool],
        window_ms: float = 5.0,
        threads: int | None = None,
    ) -> None:
        self._engine = engine
        #: threads the worker computes with (read before every step; ``None``: torch's setting as inherited)
        self.threads = threads
        #: the thread count the worker's last step ran with (0 before the first)
        self.worker_threads = 0
        self._prompt_fn = prompt_fn
        self._text_fn = text_fn
        self._should_stop = should_stop
        self._window = window_ms / 1000.0
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._lock = threading.Lock()
        #: how many times the batch started from idle and how many requests joined it (for logs and tests)
        self.batches_served = 0
        self.requests_served = 0
        #: the largest number of rows that decoded together (for benchmarks)
        self.peak_rows = 0

    async def submit(self, history: History) -> str:
        """Queue one history and await its reply."""
        if self._closed:
            raise RuntimeError("policy is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str] = loop.create_future()
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="policy-continuous-batch", daemon=True)
                self._thread.start()
        self._queue.put(_Request(history, future, loop))
        return await future

    def _generation(self, request: _Request) -> GenerationRequest | None:
        """The engine's request for a caller's, or ``None`` where its prompt cannot be built (caller told)."""
        try:
            prompt = self._prompt_fn(request.history)
        except Exception as error:  # a bad history fails its own request only
            request.loop.call_soon_threadsafe(_settle, request.future, None, error)
            return None

        def done(tokens: list[int], request: _Request = request) -> None:
            request.loop.call_soon_threadsafe(_settle, request.future, self._text_fn(tokens), None)

        def failed(error: BaseException, request: _Request = request) -> None:
            request.loop.call_soon_threadsafe(_settle, request.future, None, error)

        return GenerationRequest(
            prompt, repeats=self._engine.repeats(), on_done=done, on_error=failed, cancelled=request.future.done
        )

    def _run(self) -> None:
        batch = self._engine.new_batch(should_stop=self._should_stop)
        waiting: list[GenerationRequest] = []  # in arrival order: joins as rows free up
        stopping = False
        while True:
            if batch.size == 0 and not waiting:
                if stopping:
                    return
                first = self._queue.get()
                if first is None:
                    return
                arrivals = [first]
                try:  # an idle batch gathers for the window, as the micro-batcher does
                    while len(arrivals) < self._engine.max_rows:
                        item = self._queue.get(timeout=self._window)
                        if item is None:
                            stopping = True
                            break
                        arrivals.append(item)
                except queue.Empty:
                    pass
                self.batches_served += 1
            else:
                arrivals = []
                while True:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        stopping = True
                        break
                    arrivals.append(item)
            for request in arrivals:
                if request.future.done():  # its caller gave up while it queued
                    continue
                generation = self._generation(request)
                if generation is not None:
                    waiting.append(generation)
            waiting = [g for g in waiting if g.cancelled is None or not g.cancelled()]
            while waiting and batch.can_admit(waiting[0]):
                batch.admit(waiting.pop(0))
                self.requests_served += 1
            if self._should_stop():
                batch.abandon()
                for generation in waiting:
                    if generation.on_done is not None:
                        generation.on_done([])
                waiting.clear()
                continue
            if batch.size == 0:
                continue
            self.peak_rows = max(self.peak_rows, batch.size)
            try:
                self.worker_threads = _use_threads(self.threads)
                batch.step()
            except Exception as error:  # one failing step fails the requests in the batch, not the worker
                logger.exception("policy decode step failed")
                batch.fail(error)

    def close(self) -> None:
        """Stop the worker: replies in progress end where they are when the policy is closed too."""
        self._closed = True
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30)


def _settle(future: asyncio.Future[str], text: str | None, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(text or FALLBACK_REPLY)


class LearnedPolicy:
    """A :class:`learning.interface.Policy` backed by the base model, optionally with LoRA and value heads."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        task: TaskSpec,
        *,
        name: str,
        algorithm: str,
        version_id: int | None = None,
        heads: ValueHeads | None = None,
        value_model: torch.nn.Module | None = None,
        decode_config: DecodeConfig = DecodeConfig(),
        max_prompt_tokens: int = 1024,
        batch_window_ms: float = 5.0,
        max_batch: int = 16,
        prefix_cache_mb: int = 512,
        engine: bool = True,
        threads: int | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.task = task
        self.name = name
        self.algorithm = algorithm
        self.version_id = version_id
        self.heads = heads.eval() if heads is not None else None
        self.value_model = value_model.eval() if value_model is not None else None
        self.decode_config = decode_config
        self.max_prompt_tokens = max_prompt_tokens
        self._end_id = end_of_turn_id(tokenizer)
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self._end_id
        self._model_lock = threading.Lock()
        self._closed = False
        #: the fast path (continuous batching, prefix cache) where the model allows it, else ``None``
        self.engine: DecodeEngine | None = None
        if engine and engine_supports(model) and (value_model is None or engine_supports(value_model)):
            self.engine = DecodeEngine(
                model,
                config=decode_config,
                end_id=self._end_id,
                heads=self.heads,
                value_model=self.value_model,
                max_rows=max_batch,
                max_batch_tokens=max_batch * max_prompt_tokens,
                prefix_cache_bytes=prefix_cache_mb << 20,
            )
            self.engine.pin(self.conversation_start())
        self.batcher: MicroBatcher | ContinuousBatcher
        if self.engine is not None:
            self.batcher = ContinuousBatcher(
                self.engine,
                self.prompt_ids,
                self._to_text,
                should_stop=self._is_closed,
                window_ms=batch_window_ms,
                threads=threads,
            )
        else:
            self.batcher = MicroBatcher(
                self.respond_batch, window_ms=batch_window_ms, max_batch=max_batch, threads=threads
            )

    @property
    def threads(self) -> int | None:
        """Threads the worker behind :meth:`respond` decodes with (``None``: torch's setting where it started).

        Setting it takes effect before the worker's next step: serving keeps its share of the CPUs while a
        confined improvement run trains and takes them all back afterwards. The thread that loads a policy is
        best kept at one thread: GNU OpenMP keeps every thread's pool for good, and once its pools hold more
        threads than there are CPUs it stops spinning between parallel regions, which made a one-row decode
        step ~1.5× slower (measured on 2 cores: 18.4 vs 28.0 tokens/s)."""
        return self.batcher.threads

    @threads.setter
    def threads(self, threads: int | None) -> None:
        self.batcher.threads = threads

    # --- prompts -------------------------------------------------------------------------------------------

    def prompt_ids(self, history: History) -> list[int]:
        """The chat-template prompt for the next agent reply (user turns with their notes, :mod:`learning.notes`),
        dropping the oldest turns to fit."""
        turns = [
            {"role": ROLE_NAMES.get(m.role, "user"), "content": clean_text(self.tokenizer, m.text)}
            for m in with_notes(self.task, history)
        ]
        system = [{"role": "system", "content": self.task.system_prompt}]
        budget = self.max_prompt_tokens - self.decode_config.max_new_tokens
        while True:
            text = self.tokenizer.apply_chat_template(system + turns, tokenize=False, add_generation_prompt=True)
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            if len(ids) <= budget or len(turns) <= 1:
                return ids[-budget:] if len(ids) > budget else ids
            turns = turns[1:]

    def conversation_start(self) -> list[int]:
        """The tokens every conversation's first prompt starts with — the system prompt, the opening line and
        the user turn's header — which the engine encodes once and keeps (:meth:`DecodeEngine.pin`)."""
        opening = Message("agent", self.task.opening_line)
        first, second = (self.prompt_ids([opening, Message("user", text)]) for text in ("a", "b"))
        shared = next((i for i, (x, y) in enumerate(zip(first, second, strict=False)) if x != y), len(first))
        return first[:shared]

    # --- the Policy protocol ------------------------------------------------------------------------------

    def respond_batch(self, histories: Sequence[History], *, seed: int | None = None) -> list[str]:
        """One reply per history, generated as one batch (thread-safe; calls are serialized)."""
        if self._closed:
            raise RuntimeError(f"policy {self.name} is closed")
        if not histories:
            return []
        prompts = [self.prompt_ids(h) for h in histories]
        device = next(self.model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        if self.engine is not None:
            tokens = self.engine.generate(prompts, generator=generator, should_stop=self._is_closed)
            return [self._to_text(t) for t in tokens]
        with self._model_lock:
            if self.heads is not None and self.heads.config.level == "utterance" and self.decode_config.candidates > 1:
                tokens, _ = rerank_utterances(
                    self.model,
                    prompts,
                    end_id=self._end_id,
                    pad_id=self._pad_id,
                    config=self.decode_config,
                    heads=self.heads,
                    generator=generator,
                    value_model=self.value_model,
                    should_stop=self._is_closed,
                )
            else:
                tokens = decode(
                    self.model,
                    prompts,
                    end_id=self._end_id,
                    pad_id=self._pad_id,
                    config=self.decode_config,
                    heads=self.heads,
                    generator=generator,
                    value_model=self.value_model if self.decode_config.beta else None,
                    should_stop=self._is_closed,
                ).tokens
        return [self._to_text(t) for t in tokens]

    async def respond(self, history: History) -> str:
        """One reply; concurrent calls share one batched generate in the worker thread."""
        if self._closed:
            raise RuntimeError(f"policy {self.name} is closed")
        return await self.batcher.submit(history)

    def close(self) -> None:
        """Stop the batching worker and drop the model; further calls raise ``RuntimeError``."""
        if self._closed:
            return
        self._closed = True
        self.batcher.close()
        if self.engine is not None:
            self.engine.prefix.clear(pinned=True)
            self.engine.value_prefix.clear(pinned=True)

    def _is_closed(self) -> bool:
        return self._closed

    def _to_text(self, tokens: list[int]) -> str:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        text = "".join(ch for ch in text if ch.isprintable() or ch == "\n").strip()
        return text or FALLBACK_REPLY


def load_policy(
    source: str | Path,
    *,
    task: TaskSpec,
    base_model: str = "smollm2",
    cache_dir: Path | None = None,
    device: str = "auto",
    version_id: int | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    temperature: float = DEFAULT_TEMPERATURE,
    top_k: int = DEFAULT_TOP_K,
    beta: float | None = None,
    candidates: int | None = None,
    threads: int | None = None,
) -> LearnedPolicy:
    """Load ``"base"`` (prompted base model) or a checkpoint directory as a ready-to-serve policy.

    ``beta`` overrides the checkpoint's ILQL β (token level); ``candidates`` its K (utterance level); ``threads``
    is the decoding worker's thread count (:attr:`LearnedPolicy.threads`).
    Raises :class:`PolicyLoadError` with a clear message for a missing directory, a corrupt checkpoint or a
    checkpoint trained on another base model.
    """
    device = resolve_device(device)
    if str(source) == "base":
        base = _load_base(base_model, cache_dir, device)
        config = DecodeConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k)
        return LearnedPolicy(
            base.model,
            base.tokenizer,
            task,
            name="base",
            algorithm="base",
            version_id=version_id,
            decode_config=config,
            threads=threads,
        )

    directory = Path(source)
    if not directory.is_dir():
        raise PolicyLoadError(f"no checkpoint directory at {directory}")
    try:
        verify_checkpoint(directory)
        manifest = load_manifest(directory)
    except CheckpointError as error:
        raise PolicyLoadError(str(error)) from error
    base = _load_base(base_model, cache_dir, device)
    try:
        check_base_model(manifest, base.model_id, directory)
    except CheckpointError as error:
        raise PolicyLoadError(str(error)) from error
    algorithm = manifest["algorithm"]
    try:
        model = load_lora(base.model, directory, trainable=False).merge_and_unload()
    except Exception as error:  # peft raises several types for a broken adapter
        raise PolicyLoadError(f"{directory}: cannot load the LoRA adapter: {error}") from error
    ilql_config = ILQLConfig(**manifest.get("config", {}).get("ilql", {}))
    heads = None
    value_model = None
    if (directory / HEADS_FILE).is_file() and algorithm.startswith("ilql"):
        embedding = model.get_output_embeddings().weight
        heads = ValueHeads(embedding.shape[1], embedding.shape[0], ilql_config)
        try:
            heads.load_state_dict(load_file(str(directory / HEADS_FILE)))
        except (RuntimeError, ValueError) as error:
            raise PolicyLoadError(f"{directory}: value heads do not fit this model: {error}") from error
        heads.to(device)
        if ilql_config.value_features == "base":  # the heads read the base trunk (adapter off): keep a copy
            value_model = _load_base(base_model, cache_dir, device).model
    resolved_beta = beta if beta is not None else (ilql_config.beta if heads is not None else 0.0)
    config = DecodeConfig(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        beta=resolved_beta if ilql_config.level == "token" else 0.0,
        candidates=(candidates or ilql_config.candidates) if heads is not None else 1,
    )
    name = f"{algorithm}#{version_id}" if version_id is not None else algorithm
    return LearnedPolicy(
        model.to(device),
        base.tokenizer,
        task,
        name=name,
        algorithm=algorithm,
        version_id=version_id,
        heads=heads,
        value_model=value_model,
        decode_config=config,
        threads=threads,
    )


def _load_base(base_model: str, cache_dir: Path | None, device: str) -> Any:
    try:
        return load_base_model(base_model, cache_dir=cache_dir, device=device)
    except BaseModelError as error:
        raise PolicyLoadError(str(error)) from error
