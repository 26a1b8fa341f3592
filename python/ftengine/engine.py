"""The Engine: a model, its tokenizer and the native runtime behind one object.

    engine = Engine.from_pretrained("path/to/model")
    print(engine.generate("The capital of France is", SamplingParams(max_new_tokens=20)).text)
    for event in engine.stream("Once upon a time"):
        print(event.text, end="", flush=True)
"""

from __future__ import annotations

import json
import math
import os
import secrets
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import _C, distributed
from .checkpoint import open_checkpoint
from .config import ModelConfig
from .errors import ConfigError, ContextLengthError, FtengineError, InvalidTokenError
from .loader import check_against_spec, stream_weights
from .sampling import SamplingParams
from .tokenizer import IncrementalDetokenizer, Tokenizer

_FINISH_REASONS = {
    _C.FinishReason.stop_token: "stop",
    _C.FinishReason.length: "length",
}
_DEVICES = ("cpu", "cuda") if _C.has_cuda else ("cpu",)
_WEIGHT_DTYPES = {"cpu": ("float32", "bfloat16"), "cuda": ("bfloat16", "float16")}


@dataclass
class GenerationOutput:
    """One finished request: the new text and token ids, and why it stopped
    ("stop": an end token or stop string; "length": max_new_tokens)."""

    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None


@dataclass
class StreamEvent:
    """A piece of newly generated text for request `index` (the position of its prompt)."""

    index: int
    text: str
    token_id: int | None
    finish_reason: str | None = None


Prompt = str | Sequence[int]


def _kv_bytes_per_token(config: ModelConfig, device: str, tp: int = 1) -> int:
    # float32 KV on the CPU, 16-bit on the GPU (and in its host tier); a tensor-parallel rank
    # holds its share of the KV heads (one, replicated, when there are fewer heads than ranks).
    element = 2 if device == "cuda" else 4
    kv_heads = max(config.num_kv_heads // tp, 1)
    return config.num_layers * 2 * kv_heads * config.head_dim * element


def _gpu_kv_tokens(config: ModelConfig, device_index: int, gpu_kv_budget: float | None,
                   tp: int = 1) -> int:
    """KV tokens the GPU keeps: gpu_kv_budget GiB, by default what is free before loading once
    the rank's weights and a reserve for activations, workspaces and the host tier's staging
    (a tenth of the card, at least 4 GiB) are counted."""
    per_token = _kv_bytes_per_token(config, "cuda", tp)
    if gpu_kv_budget is not None:
        return int(gpu_kv_budget * 2**30) // per_token
    free, total = _C.cuda_memory_info(device_index)
    weights = 2 * config.parameter_count() // tp
    reserve = max(4 * 2**30, total // 10)
    return max(free - weights - reserve, 0) // per_token


def _default_kv_cache_tokens(config: ModelConfig, batch: int, device: str = "cpu",
                             gpu_kv_tokens: int = 0, tp: int = 1) -> int:
    # Room for `batch` full contexts, capped at a quarter of physical memory on the CPU, at
    # the GPU's budget on the GPU (a host tier only when asked for: kv_cache_tokens).
    wanted = config.max_position_embeddings * batch
    if device == "cuda":
        return max(256, min(wanted, gpu_kv_tokens))
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(256, min(wanted, memory // 4 // _kv_bytes_per_token(config, device, tp)))


def _available_host_memory() -> int:
    """Bytes the kernel could hand out now (MemAvailable), or physical memory without /proc."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class Engine:
    """A loaded model ready to generate. Build it with Engine.from_pretrained."""

    def __init__(self, config: ModelConfig, tokenizer: Tokenizer, runtime: _C.Runtime,
                 name: str, dtype: str, comm=None) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.name = name
        self.dtype = dtype
        self._runtime = runtime
        self._comm = comm  # mpi4py communicator of a tensor-parallel engine, else None
        self._generation_lock = threading.Lock()
        self._generating_thread: int | None = None

    @property
    def rank(self) -> int:
        """This process's tensor-parallel rank (0 without tensor parallelism)."""
        return self._comm.rank if self._comm is not None else 0

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        device: str = "cpu",
        dtype: str | None = None,
        *,
        num_threads: int | None = None,
        kv_cache_tokens: int | None = None,
        max_batch_tokens: int = 2048,
        max_num_seqs: int = 16,
        block_size: int = 128,
        progress: bool = True,
        tp: int = 1,
        allreduce_tile_tokens: int = 0,
        cuda_graphs: bool = True,
        attention_kernel: str = "auto",
        gpu_kv_budget: float | None = None,
        host_tier_attention: str = "auto",
    ) -> Engine:
        """Loads a model: a Hugging Face directory (config.json, *.safetensors, tokenizer
        files), a llama.cpp GGUF file (quantised weights are dequantised at load), or a known
        model name (see ftengine.checkpoint.KNOWN_MODELS).

        device is "cpu", "cuda" or "cuda:N" (builds with the CUDA backend). On the CPU, dtype
        stores the weight matrices as "float32" or "bfloat16" (default: bfloat16 when the
        checkpoint is bfloat16, else float32; GGUF files default to float32) and arithmetic is
        float32 either way; on the GPU, weights, activations and the KV cache are "bfloat16"
        (default) or "float16", with float32 accumulation. num_threads defaults to every core.
        kv_cache_tokens sizes the paged KV cache shared by all requests; max_batch_tokens caps
        the tokens of one forward step (longer prompts are prefilled in chunks) and max_num_seqs
        the requests decoded together. cuda_graphs records decode steps on the GPU as CUDA
        graphs and replays them (False launches every kernel, for debugging); attention_kernel
        forces one member of the GPU FastAttention family ("prefill_sm80", ...) for every
        attention call instead of the best for each ("auto").

        On the GPU, gpu_kv_budget (GiB) bounds the KV cache kept in GPU memory (default: the
        memory free beside the weights, less a reserve of a tenth of the card, at least 4 GiB).
        A kv_cache_tokens beyond it puts the rest in a host tier of pinned host memory:
        attention then runs over both tiers (CPU-GPU cooperative attention).
        host_tier_attention picks where host keys are attended: "stream" copies them to the
        GPU, "cpu" has the CPU attend over them in place while the GPU attends over its own,
        "auto" splits decode between the two in the ratio that makes both finish together
        (learnt as it runs) and streams prompt chunks.

        tp > 1 splits the model over that many MPI ranks (run under `mpirun -np tp`; every rank
        makes the same calls). On the GPU the ranks sum over NCCL, one GPU each: "cuda" takes
        the rank's place among the ranks of its node as the GPU index, "cuda:K" GPU K.
        allreduce_tile_tokens sets the token tile of the overlapped AllReduce after row-parallel
        projections: 0 chooses, -1 turns tiling off.
        """
        device_kind, requested_index = _parse_device(device)
        device_index = requested_index or 0
        if gpu_kv_budget is not None:
            if device_kind != "cuda":
                raise FtengineError("gpu_kv_budget sizes the GPU's share of the KV cache: "
                                    "it needs device='cuda'")
            if isinstance(gpu_kv_budget, bool) or not isinstance(gpu_kv_budget, (int, float)) \
                    or not 0 < gpu_kv_budget < math.inf:
                raise FtengineError(f"gpu_kv_budget must be a positive number of GiB, got "
                                    f"{gpu_kv_budget!r}")
        if host_tier_attention not in ("auto", "cpu", "stream"):
            raise FtengineError(f"host_tier_attention must be auto, cpu or stream, got "
                                f"{host_tier_attention!r}")
        if dtype is not None and dtype not in _WEIGHT_DTYPES[device_kind]:
            raise FtengineError(
                f"dtype on {device_kind} must be one of {_WEIGHT_DTYPES[device_kind]}, "
                f"got {dtype!r}")
        for name, value in (("max_batch_tokens", max_batch_tokens),
                            ("max_num_seqs", max_num_seqs), ("block_size", block_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise FtengineError(f"{name} must be a positive integer, got {value!r}")
        if max_batch_tokens < max_num_seqs:
            raise FtengineError(
                f"max_batch_tokens ({max_batch_tokens}) must be at least max_num_seqs "
                f"({max_num_seqs}): every step decodes one token of each running sequence"
            )
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
            raise FtengineError(f"tp must be a positive integer, got {tp!r}")
        comm, communicator = distributed.world(tp)
        rank = comm.rank if comm is not None else 0

        def on_every_rank(step):
            """Runs `step`; with several ranks, all of them learn of a failure on any."""
            if comm is None:
                return step()
            result, error = None, None
            try:
                result = step()
            except BaseException as failure:  # reported to every rank, then re-raised
                error = failure
            distributed.all_succeeded(comm, error)
            return result

        def open_and_check():
            checkpoint = open_checkpoint(path)
            native_config = checkpoint.config.native_dict(
                dtype or _default_dtype(device_kind, checkpoint.default_dtype))
            try:
                specs = _C.expected_weights(native_config, rank, tp)
            except ValueError as bad:
                raise ConfigError(f"{checkpoint.name}: {bad}") from None
            needed = check_against_spec(checkpoint.entries, specs, checkpoint.name,
                                        checkpoint.config.tie_word_embeddings)
            return checkpoint, native_config, needed

        checkpoint, native_config, needed = on_every_rank(open_and_check)
        config = checkpoint.config
        dtype = native_config["weight_dtype"]
        if comm is not None:
            distributed.agree(comm, "the model configuration",
                              json.dumps(native_config, sort_keys=True))
            distributed.agree(comm, "the model weights", checkpoint.fingerprint())
            distributed.agree(comm, "the engine settings",
                              (device_kind, kv_cache_tokens, max_batch_tokens, max_num_seqs,
                               block_size, allreduce_tile_tokens, cuda_graphs, attention_kernel))
            if device_kind == "cuda":
                # NCCL starts before the KV cache is sized: its buffers take GPU memory too.
                device_index = on_every_rank(
                    lambda: distributed.gpu_of_rank(comm, requested_index))
                host_communicator = communicator
                communicator = on_every_rank(lambda: distributed.nccl_communicator(
                    comm, device_index, host_communicator))
        gpu_kv_tokens = (_gpu_kv_tokens(config, device_index, gpu_kv_budget, tp)
                         if device_kind == "cuda" else 0)
        if comm is not None and device_kind == "cuda":
            # Where the host tier starts decides how steps are chunked: every rank the same.
            gpu_kv_tokens = distributed.smallest(comm, gpu_kv_tokens)
        if kv_cache_tokens is None:
            kv_cache_tokens = _default_kv_cache_tokens(config, max_num_seqs, device_kind,
                                                       gpu_kv_tokens, tp)
            if comm is not None:
                # Sized from each host's memory: every rank takes the smallest, or ranks with
                # room for more requests would schedule steps the others cannot follow.
                kv_cache_tokens = distributed.smallest(comm, kv_cache_tokens)

        if device_kind == "cuda" and kv_cache_tokens > gpu_kv_tokens:
            if gpu_kv_tokens < block_size:
                raise FtengineError(
                    f"the GPU's share of the KV cache holds {gpu_kv_tokens} tokens, less than one "
                    f"block of {block_size}: raise gpu_kv_budget or free GPU memory")
            host_bytes = ((kv_cache_tokens - gpu_kv_tokens)
                          * _kv_bytes_per_token(config, "cuda", tp))
            available = _available_host_memory()
            if host_bytes > 0.9 * available:
                raise FtengineError(
                    f"kv_cache_tokens={kv_cache_tokens} needs {host_bytes / 2**30:.1f} GiB of "
                    f"host memory beside the GPU's {gpu_kv_tokens} tokens, with "
                    f"{available / 2**30:.1f} GiB available: lower kv_cache_tokens or raise "
                    f"gpu_kv_budget")
        else:
            gpu_kv_tokens = 0  # everything fits the GPU: no host tier

        def load():
            runtime = _C.Runtime(
                native_config,
                num_threads=num_threads or 0,
                kv_cache_tokens=kv_cache_tokens,
                block_size=block_size,
                max_step_tokens=max_batch_tokens,
                max_sequences=max_num_seqs,
                communicator=communicator,
                allreduce_tile_tokens=allreduce_tile_tokens,
                device=device_kind,
                device_index=device_index,
                cuda_graphs=cuda_graphs,
                attention_kernel=attention_kernel,
                gpu_kv_tokens=gpu_kv_tokens,
                host_tier_route=host_tier_attention,
            )
            stream_weights(needed, runtime.add_weight, progress and rank == 0,
                           f"loading {Path(checkpoint.name).name}")
            runtime.build()
            return runtime

        runtime = on_every_rank(load)
        return cls(config, checkpoint.tokenizer, runtime, checkpoint.name, dtype, comm)

    # ---- prompts -------------------------------------------------------------------------

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Token ids of a text prompt (with the tokenizer's BOS), or a checked copy of ids."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (Sequence, np.ndarray)):
            ids = list(prompt)
        else:
            raise InvalidTokenError(
                f"a prompt must be a string or a sequence of token ids, got {prompt!r}"
            )
        vocab = self.config.vocab_size
        for position, token in enumerate(ids):
            if isinstance(token, bool) or not isinstance(token, (int, np.integer)):
                raise InvalidTokenError(
                    f"token at position {position} is not an integer: {token!r}")
            if not 0 <= token < vocab:
                raise InvalidTokenError(
                    f"token id {token} at position {position} is outside the vocabulary "
                    f"[0, {vocab})"
                )
        if not ids:
            raise InvalidTokenError("the prompt is empty: give at least one token")
        return [int(t) for t in ids]

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation rendered through the model's chat template."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.encode_prompt(self.tokenizer.encode(text, add_special_tokens=False))

    def _check_fits(self, ids: list[int], max_new_tokens: int) -> None:
        total = len(ids) + max_new_tokens
        limit = self.config.max_position_embeddings
        if total > limit:
            raise ContextLengthError(
                f"prompt of {len(ids)} tokens + max_new_tokens {max_new_tokens} = {total} "
                f"exceeds the model's context of {limit} tokens: shorten the prompt or lower "
                f"max_new_tokens"
            )
        capacity = self._runtime.kv_cache_tokens
        if total > capacity:
            raise ContextLengthError(
                f"{total} tokens do not fit the KV cache of {capacity} tokens: pass a larger "
                f"kv_cache_tokens to Engine.from_pretrained"
            )

    # ---- generation ----------------------------------------------------------------------

    def stream(self, prompts: Prompt | Sequence[Prompt],
               params: SamplingParams | None = None) -> Iterator[StreamEvent]:
        """Generates for one prompt or a batch, yielding text as it is produced. Every request
        ends with one event whose finish_reason is set."""
        params = params or SamplingParams()
        params.validate()
        batch = self._as_batch(prompts)
        encoded = [self.encode_prompt(p) for p in batch]
        for ids in encoded:
            self._check_fits(ids, params.max_new_tokens)
        self._check_stop_ids(params)
        outputs = [GenerationOutput(prompt_token_ids=ids) for ids in encoded]
        yield from self._run(outputs, params)

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | None = None):
        """Generates to completion. One prompt gives one GenerationOutput; a list of prompts
        gives a list, in order."""
        params = params or SamplingParams()
        params.validate()
        batch = self._as_batch(prompts)
        outputs = [GenerationOutput(prompt_token_ids=self.encode_prompt(p)) for p in batch]
        for output in outputs:
            self._check_fits(output.prompt_token_ids, params.max_new_tokens)
        self._check_stop_ids(params)
        for _ in self._run(outputs, params):
            pass
        return outputs if self._is_batch(prompts) else outputs[0]

    def chat(self, messages: list[dict[str, str]], params: SamplingParams | None = None,
             stream: bool = False):
        """Answers the conversation `messages` ([{"role": ..., "content": ...}, ...])."""
        ids = self.chat_prompt(messages)
        return self.stream([ids], params) if stream else self.generate([ids], params)[0]

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Next-token logits at every position of `token_ids`, float32 [len, vocab]."""
        ids = self.encode_prompt(token_ids)
        self._check_fits(ids, 0)  # nothing is generated: the prompt alone must fit
        return self._runtime.prompt_logits(ids)

    def _check_stop_ids(self, params: SamplingParams) -> None:
        for token in params.stop_token_ids:
            if not 0 <= token < self.config.vocab_size:
                raise InvalidTokenError(
                    f"stop token id {token} is outside the vocabulary [0, {self.config.vocab_size})"
                )

    @staticmethod
    def _is_batch(prompts: Prompt | Sequence[Prompt]) -> bool:
        # A batch is a sequence of prompts (texts or id sequences); anything else is one prompt,
        # which encode_prompt accepts or rejects with InvalidTokenError.
        if isinstance(prompts, str) or not isinstance(prompts, (Sequence, np.ndarray)):
            return False
        return len(prompts) > 0 and isinstance(prompts[0], (str, Sequence, np.ndarray))

    def _as_batch(self, prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
        return list(prompts) if self._is_batch(prompts) else [prompts]

    def _run(self, outputs: list[GenerationOutput],
             params: SamplingParams) -> Iterator[StreamEvent]:
        # One generation at a time: runtime.step() advances every running request, so a second
        # generation interleaved with this one would receive its tokens. Other threads wait;
        # the same thread (two streams consumed alternately) gets an error instead of a
        # deadlock.
        if self._generating_thread == threading.get_ident():
            raise FtengineError(
                "this engine is already generating on this thread: finish or close the other "
                "stream first, or pass all prompts to one generate()/stream() call"
            )
        with self._generation_lock:
            self._generating_thread = threading.get_ident()
            try:
                yield from self._run_locked(outputs, params)
            finally:
                self._generating_thread = None

    def _run_locked(self, outputs: list[GenerationOutput],
                    params: SamplingParams) -> Iterator[StreamEvent]:
        stop_ids = list(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids += sorted(set(self.tokenizer.eos_token_ids) | set(self.config.eos_token_ids))
        base_seed = params.seed if params.seed is not None else secrets.randbits(63)
        if self._comm is not None:  # every rank must draw the same tokens
            base_seed = self._comm.bcast(base_seed, root=0)
        runtime = self._runtime
        # top_k beyond the vocabulary cuts nothing; clamped so it fits the native int32.
        top_k = min(params.top_k, self.config.vocab_size)
        by_request = {}
        try:  # a request added before a later one fails must not stay in the runtime
            for index, output in enumerate(outputs):
                request = runtime.add_request(
                    output.prompt_token_ids, params.temperature, top_k, params.top_p,
                    params.repetition_penalty, (base_seed + index) % 2**64,
                    params.max_new_tokens, stop_ids,
                )
                by_request[request] = (index, IncrementalDetokenizer(self.tokenizer),
                                       _StopStrings(params.stop))
            while by_request:
                for request, token, finish in runtime.step():
                    index, detokenizer, stops = by_request[request]
                    output = outputs[index]
                    output.token_ids.append(token)
                    reason = _FINISH_REASONS.get(finish)
                    # An end token ends the request without becoming text; a finished request
                    # releases text the detokenizer held back for an incomplete character.
                    piece = "" if finish == _C.FinishReason.stop_token else detokenizer.push(token)
                    if reason is not None:
                        piece += detokenizer.flush()
                    text, hit = stops.feed(piece, final=reason is not None)
                    if hit:
                        runtime.abort(request)
                        reason = "stop"
                    output.text += text
                    if reason is not None:
                        output.finish_reason = reason
                        del by_request[request]
                    yield StreamEvent(index, text, token, reason)
        finally:
            for request in by_request:  # the caller stopped iterating: free the cache
                runtime.abort(request)


class _StopStrings:
    """Cuts generated text at the first stop string, which may span several tokens.

    Text that could still turn out to be the start of a stop string is held back until it is
    clear either way, so a stream never shows the part of a stop string it later cuts.
    """

    def __init__(self, stops: list[str]) -> None:
        self._stops = stops
        self._longest = max((len(stop) for stop in stops), default=0)
        self._held = ""

    def feed(self, piece: str, final: bool) -> tuple[str, bool]:
        """The text to emit now, and whether a stop string completed."""
        if not self._stops:
            return piece, False
        text = self._held + piece
        cut = min((i for stop in self._stops if (i := text.find(stop)) != -1), default=-1)
        if cut != -1:
            self._held = ""
            return text[:cut], True
        keep = 0 if final else self._partial_match(text)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def _partial_match(self, text: str) -> int:
        """Length of the longest suffix of `text` that begins some stop string."""
        for length in range(min(len(text), self._longest - 1), 0, -1):
            suffix = text[-length:]
            if any(stop.startswith(suffix) for stop in self._stops):
                return length
        return 0


def _parse_device(device: str) -> tuple[str, int | None]:
    """(kind, index) from "cpu", "cuda" or "cuda:N"; the index is None where none is named."""
    kind, _, index = str(device).partition(":")
    if kind not in _DEVICES or (index and (kind != "cuda" or not index.isdigit())):
        available = ", ".join(_DEVICES)
        hint = "" if _C.has_cuda else " (this build has no CUDA backend: install on a machine "\
            "with nvcc and cuBLAS)"
        raise FtengineError(f"device {device!r} is not available; use one of: {available}{hint}")
    return kind, int(index) if index else None


def _default_dtype(device_kind: str, checkpoint_dtype: str) -> str:
    """Weight storage when the caller names none: the checkpoint's own where the device runs it;
    on the CPU float16 files widen to float32 (exact); on the GPU float32 checkpoints run in
    bfloat16 (the tensor cores' type, float32's range)."""
    if checkpoint_dtype in _WEIGHT_DTYPES[device_kind]:
        return checkpoint_dtype
    return "float32" if device_kind == "cpu" else "bfloat16"
