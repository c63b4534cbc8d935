"""Peer decoders measured the same way as adaspec: same GGUF weights, same prompt ids, greedy.

``hf`` / ``hf-pld`` (transformers ``generate``, plain and with prompt lookup), ``llama.cpp`` / ``llama.cpp-pld``
(llama-cpp-python on the GGUF itself, plain and with its prompt-lookup draft: kernel speed without HTTP or
scheduling), and the llama-server peers (what CPU users run: plain, its ``ngram-mod`` speculation, a draft model;
over HTTP, like ``adaspec serve``). How each is timed is on :class:`Peer`. A peer that cannot run here raises
``PeerUnavailable`` with the reason; ``available(name)`` checks without loading anything.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..files import bundled_gguf_path
from .servers import LLAMA_SERVER_SETUPS

PEERS = ("hf", "hf-pld", "llama.cpp", "llama.cpp-pld", *LLAMA_SERVER_SETUPS)
_REQUIRES = {"hf": ("torch", "transformers", "gguf", "accelerate"), "llama.cpp": ("llama_cpp",),
             "llama-server": ("httpx",)}


class PeerUnavailable(RuntimeError):
    """A peer cannot run here (a package or the model file is missing); the message says which."""


def bundled_gguf() -> Path:
    """The bundled GGUF (:func:`adaspec.files.bundled_gguf_path`); :class:`PeerUnavailable` when it is missing."""
    try:
        return bundled_gguf_path()
    except FileNotFoundError as e:
        raise PeerUnavailable(str(e)) from None


def _backend(name: str) -> str:
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; choose from {PEERS}")
    if name.startswith("llama-server"):
        return "llama-server"
    return "hf" if name.startswith("hf") else "llama.cpp"


def missing_packages(name: str) -> list[str]:
    """Packages a peer needs that cannot be imported (found by ``importlib.util.find_spec``)."""
    return [m for m in _REQUIRES[_backend(name)] if importlib.util.find_spec(m) is None]


def available(name: str) -> bool:
    """Whether the peer's packages are installed (nothing is loaded)."""
    return not missing_packages(name)


def _import(module: str, peer: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        hint = {"llama_cpp": "pip install llama-cpp-python"}.get(module, f"pip install {module}")
        raise PeerUnavailable(f"peer {peer!r} needs the package {module!r} ({hint}): {e}") from e


@dataclass
class PeerConfig:
    """How the peers are built; the defaults match the published comparison setup."""

    gguf_path: str | None = None  # model file; None = the bundled SmolLM2 GGUF
    n_threads: int = 2  # llama.cpp threads (generation and batch)
    torch_threads: int | None = None  # set torch's intra-op threads for the HF peers; None leaves torch as it is
    n_ctx: int = 2048  # llama.cpp context window
    prompt_lookup_num_tokens: int = 10  # draft length of both prompt-lookup peers
    max_ngram_size: int = 2  # longest n-gram the prompt lookup matches (both libraries default to 2)
    stop_at_eos: bool = True  # stop at the end-of-sequence token (False: always produce max_tokens)
    warmup_tokens: int = 4  # tokens generated once at construction so the first timed call is warm (0 = none)
    draft_model: str | None = None  # llama-server-draft's draft GGUF (same tokenizer as the target)


@dataclass
class PeerResult:
    """One generation by one peer."""

    peer: str
    prompt_tokens: int
    tokens: list[int]  # generated ids, EOS excluded
    seconds: float  # wall time of the call: prefill + decode
    ttft_seconds: float | None  # time to the first generated token
    matches_reference: bool | None = None  # tokens == reference, when one was given
    common_prefix: int | None = None  # length of the common prefix with the reference
    drafted: int = 0  # draft tokens verified (peers that report them: llama-server's timings)
    accepted: int = 0  # draft tokens accepted
    timings: dict | None = None  # the engine's own figures of the call (llama-server's ``timings``)

    @property
    def tok_s(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        """Tokens per second after the first token."""
        if self.ttft_seconds is None or len(self.tokens) < 2 or self.seconds <= self.ttft_seconds:
            return 0.0
        return (len(self.tokens) - 1) / (self.seconds - self.ttft_seconds)

    def to_dict(self) -> dict:
        return asdict(self) | {"tok_s": self.tok_s, "decode_tok_s": self.decode_tok_s}


def compare(tokens: Sequence[int], reference: Sequence[int]) -> tuple[bool, int]:
    """(exact match, common prefix length) of two greedy outputs."""
    n = 0
    for a, b in zip(tokens, reference):
        if a != b:
            break
        n += 1
    return list(tokens) == list(reference), n


class Peer:
    """Base: tokenization of text prompts, the timing, and the reference check.

    Peers:

    * ``hf``            HF transformers ``generate()``, fp32 weights dequantised from the GGUF, plain greedy;
    * ``hf-pld``        the same with prompt lookup decoding (``prompt_lookup_num_tokens``);
    * ``llama.cpp``     llama-cpp-python on the GGUF itself (Q4_1 kernels), plain greedy, with flash attention on
                        (llama.cpp's own default on CPU, and its faster setting there);
    * ``llama.cpp-pld`` the same with its Python prompt-lookup draft (``LlamaPromptLookupDecoding``).

    Every peer takes token ids (or chat-templated text, which it tokenizes itself
    without adding special tokens) and a token budget, and returns the generated
    ids (the EOS token excluded, as the engine does) with the wall time of the whole
    call: prefill and decode, timed with ``time.perf_counter`` around the call, after
    one warm-up call at construction. The time to the first token is taken from a
    streamer (HF) or the first yielded token (llama.cpp). Numerics differ between
    backends (fp32 vs Q4_1 kernels), so greedy outputs are expected to match a
    reference only within one backend; ``PeerResult.common_prefix`` says how far
    they agree.
    """

    name: str = ""
    samples: bool = False
    """Whether the peer runs sampled requests (temperature > 0, seeded); the others decode greedily only."""

    def __init__(self, config: PeerConfig):
        self.config = config

    # backends implement these two
    def tokenize(self, text: str) -> list[int]:
        raise NotImplementedError

    def _generate(self, ids: list[int], max_tokens: int, first_token: Callable[[], None],
                  temperature: float = 0.0, seed: int | None = None) -> list[int]:
        """Ids after ``ids`` (EOS excluded), greedy unless ``temperature`` > 0 (peers with ``samples`` only);
        calls ``first_token()`` once when the first id is known."""
        raise NotImplementedError

    def _call_figures(self) -> tuple[int, int, dict | None]:
        """(drafted, accepted, the engine's own timings) of the last ``_generate``, for peers that report them."""
        return 0, 0, None

    def close(self) -> None:
        pass

    def generate(self, prompt: str | Sequence[int], max_tokens: int, reference: Sequence[int] | None = None,
                 temperature: float = 0.0, seed: int | None = None) -> PeerResult:
        """Generate from chat-templated text or token ids (greedy unless ``temperature`` > 0); time the whole call."""
        if max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if temperature > 0 and not self.samples:
            raise ValueError(f"peer {self.name!r} decodes greedily only")
        ids = self.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise ValueError("the prompt is empty")
        first: list[float] = []
        t0 = time.perf_counter()
        out = self._generate(ids, max_tokens, lambda: first or first.append(time.perf_counter()), temperature, seed)
        seconds = time.perf_counter() - t0
        out = out[:max_tokens]
        drafted, accepted, timings = self._call_figures()
        res = PeerResult(self.name, len(ids), out, seconds, first[0] - t0 if first else None,
                         drafted=drafted, accepted=accepted, timings=timings)
        if reference is not None:
            res.matches_reference, res.common_prefix = compare(out, reference)
        return res

    def _warmup(self) -> None:
        if self.config.warmup_tokens > 0:
            self.generate(self.tokenize("Hello"), self.config.warmup_tokens)

    def __enter__(self) -> "Peer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HFPeer(Peer):
    """transformers ``generate()`` on fp32 weights loaded from the GGUF; ``lookup > 0`` turns on prompt lookup."""

    def __init__(self, config: PeerConfig = PeerConfig(), lookup: bool = False, model=None, tokenizer=None):
        super().__init__(config)
        self.name = "hf-pld" if lookup else "hf"
        for m in _REQUIRES["hf"]:
            _import(m, self.name)
        self.torch = importlib.import_module("torch")
        transformers = importlib.import_module("transformers")
        if config.torch_threads:
            self.torch.set_num_threads(config.torch_threads)
        self.lookup = lookup
        if model is None or tokenizer is None:
            path = Path(config.gguf_path) if config.gguf_path else bundled_gguf()
            tokenizer = tokenizer or transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = model or transformers.AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=self.torch.float32)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.eos_id = self.tokenizer.eos_token_id
        self._warmup()

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _generate(self, ids: list[int], max_tokens: int, first_token: Callable[[], None],
                  temperature: float = 0.0, seed: int | None = None) -> list[int]:
        calls = []

        class _Streamer:  # put() gets the prompt first, then the new tokens of every step
            def put(self, value) -> None:
                calls.append(1)
                if len(calls) == 2:
                    first_token()

            def end(self) -> None:
                pass

        kwargs = dict(max_new_tokens=max_tokens, do_sample=False, streamer=_Streamer(),
                      pad_token_id=self.eos_id if self.eos_id is not None else 0)
        if self.lookup:
            kwargs.update(prompt_lookup_num_tokens=self.config.prompt_lookup_num_tokens,
                          max_matching_ngram_size=self.config.max_ngram_size)
        if not self.config.stop_at_eos:
            kwargs.update(eos_token_id=None)  # EOS is emitted and decoding goes on, as the engine's ignore_eos does
        inp = self.torch.tensor([ids], dtype=self.torch.long)  # [1, prompt_len]
        with self.torch.inference_mode():
            out = self.model.generate(inp, attention_mask=self.torch.ones_like(inp), **kwargs)  # [1, prompt_len + n]
        new = out[0, len(ids):].tolist()
        if self.config.stop_at_eos and self.eos_id is not None and self.eos_id in new:
            new = new[: new.index(self.eos_id)]
        return new


class LlamaCppPeer(Peer):
    """llama-cpp-python on the GGUF; ``lookup`` adds its ``LlamaPromptLookupDecoding`` draft."""

    def __init__(self, config: PeerConfig = PeerConfig(), lookup: bool = False):
        super().__init__(config)
        self.name = "llama.cpp-pld" if lookup else "llama.cpp"
        llama_cpp = _import("llama_cpp", self.name)
        draft = None
        if lookup:
            spec = _import("llama_cpp.llama_speculative", self.name)
            draft = spec.LlamaPromptLookupDecoding(max_ngram_size=config.max_ngram_size,
                                                   num_pred_tokens=config.prompt_lookup_num_tokens)
        path = Path(config.gguf_path) if config.gguf_path else bundled_gguf()
        # With a draft model llama-cpp-python keeps logits for every position, but sizes its score buffer from the
        # logits_all argument: ask for it explicitly, or prompts past n_batch tokens overflow that buffer.
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=config.n_ctx, n_threads=config.n_threads,
                                   n_threads_batch=config.n_threads, draft_model=draft, logits_all=draft is not None,
                                   flash_attn=True, verbose=False)
        self.eos_id = self.llm.token_eos()
        self._warmup()

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def _generate(self, ids: list[int], max_tokens: int, first_token: Callable[[], None],
                  temperature: float = 0.0, seed: int | None = None) -> list[int]:
        if len(ids) + max_tokens > self.config.n_ctx:
            raise ValueError(f"{len(ids)} prompt + {max_tokens} new tokens exceed the context of {self.config.n_ctx}")
        self.llm.reset()  # no KV reuse across calls: every peer prefills the whole prompt
        out: list[int] = []
        for tok in self.llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            if not out:
                first_token()
            if self.config.stop_at_eos and tok == self.eos_id:
                break
            out.append(int(tok))
            if len(out) >= max_tokens:
                break
        return out

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.close()


class LlamaServerPeer(Peer):
    """llama-server (built from the pinned llama.cpp) in a process of its own, one per configuration, over HTTP.

    Each request goes to ``/completion`` as token ids, streamed, with the prompt cache off; the time runs from
    sending the request to the last chunk, the first token's time from the first chunk that carries tokens. Its
    ``timings`` give the draft tokens verified and accepted. Sampled requests run with the sampler reduced to the
    temperature (top-k, top-p and min-p off) and the request's seed; llama-server verifies them by sampling the
    target and comparing (acceptance p(token)), not by rejection sampling.
    """

    samples = True

    def __init__(self, config: PeerConfig = PeerConfig(), setup: str = "llama-server"):
        super().__init__(config)
        self.name = setup
        import httpx

        from ..llamacpp_build import BuildError
        from .servers import start_llama_server

        path = Path(config.gguf_path) if config.gguf_path else bundled_gguf()
        try:
            self.server = start_llama_server(setup, path, config.n_threads, ctx_per_slot=config.n_ctx,
                                             draft_model=config.draft_model)
        except (BuildError, RuntimeError, ValueError) as e:
            raise PeerUnavailable(f"peer {setup!r}: {e}") from e
        self.http = httpx.Client(base_url=self.server.url, timeout=600)
        self._figures: tuple[int, int, dict | None] = (0, 0, None)
        try:
            self._warmup()
        except (httpx.HTTPError, RuntimeError, ValueError) as e:
            self.close()
            raise PeerUnavailable(f"peer {setup!r}: the first request failed: {e}") from e

    def tokenize(self, text: str) -> list[int]:
        r = self.http.post("/tokenize", json={"content": text, "add_special": False, "parse_special": True})
        r.raise_for_status()
        return [int(t) for t in r.json()["tokens"]]

    def request_body(self, ids: list[int], max_tokens: int, temperature: float, seed: int | None) -> dict:
        body = {"prompt": ids, "n_predict": max_tokens, "stream": True, "return_tokens": True, "cache_prompt": False,
                "temperature": temperature, "top_k": 0, "top_p": 1.0, "min_p": 0.0,
                "ignore_eos": not self.config.stop_at_eos}
        if seed is not None:
            body["seed"] = seed
        return body

    def _generate(self, ids: list[int], max_tokens: int, first_token: Callable[[], None],
                  temperature: float = 0.0, seed: int | None = None) -> list[int]:
        if len(ids) + max_tokens > self.config.n_ctx:
            raise ValueError(f"{len(ids)} prompt + {max_tokens} new tokens exceed the context of {self.config.n_ctx}")
        out: list[int] = []
        final: dict = {}
        with self.http.stream("POST", "/completion", json=self.request_body(ids, max_tokens, temperature, seed)) as r:
            if r.status_code != 200:
                r.read()
                raise RuntimeError(f"{self.name} answered {r.status_code}: {r.text[:300]}")
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(f"{self.name}: {chunk['error']}")
                tokens = chunk.get("tokens") or []
                if tokens and not out:
                    first_token()
                out.extend(int(t) for t in tokens)
                if chunk.get("stop"):
                    final = chunk
                    break
        timings = final.get("timings") or {}
        self._figures = (int(timings.get("draft_n", 0)), int(timings.get("draft_n_accepted", 0)), timings or None)
        return out  # streamed chunks carry one token each and never the end-of-sequence token

    def _call_figures(self) -> tuple[int, int, dict | None]:
        return self._figures

    def close(self) -> None:
        http, self.http = getattr(self, "http", None), None
        if http is not None:
            http.close()
        server = getattr(self, "server", None)
        if server is not None:
            server.stop()


def make_peer(name: str, config: PeerConfig = PeerConfig()) -> Peer:
    """Build one peer by name; raises ``PeerUnavailable`` (with the reason) when it cannot run here."""
    backend = _backend(name)
    missing = missing_packages(name)
    if missing:
        raise PeerUnavailable(f"peer {name!r} skipped: missing package(s) {', '.join(missing)}")
    if backend == "hf":
        return HFPeer(config, lookup=name.endswith("-pld"))
    if backend == "llama-server":
        return LlamaServerPeer(config, setup=name)
    return LlamaCppPeer(config, lookup=name.endswith("-pld"))


@dataclass
class PeerSet:
    """The peers that could be built, and why the others were skipped."""

    peers: dict[str, Peer] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # name -> reason

    def close(self) -> None:
        for p in self.peers.values():
            p.close()


def make_peers(names: Sequence[str] = PEERS, config: PeerConfig = PeerConfig(),
               log: Callable[[str], None] | None = print) -> PeerSet:
    """Every peer that can run here; the others are listed in ``skipped`` (and logged) with the reason.

    The two HF peers share one loaded model.
    """
    out = PeerSet()
    hf_shared = None
    for name in names:
        try:
            if _backend(name) == "hf" and hf_shared is not None:
                out.peers[name] = HFPeer(config, lookup=name.endswith("-pld"), model=hf_shared.model,
                                         tokenizer=hf_shared.tokenizer)
            else:
                out.peers[name] = make_peer(name, config)
            if _backend(name) == "hf":
                hf_shared = out.peers[name]
        except PeerUnavailable as e:
            out.skipped[name] = str(e)
            if log is not None:
                log(f"skipping peer {name}: {e}")
    return out
