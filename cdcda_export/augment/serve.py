"""``cdcda serve-teacher``: any local Hugging Face causal LM behind an OpenAI-compatible API.

FastAPI + uvicorn. Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` (non-streaming;
the tokenizer's chat template when it has one, else ``role: content`` lines), ``GET /health``.
``usage`` counts real tokens. ``response_format`` is enforced while generating, as llama.cpp's server
does with a grammar: ``{"type": "json_object"}`` allows only tokens that keep the reply a JSON object,
``{"type": "json_schema", "json_schema": {"schema": ...}}`` only those that keep it valid for the
schema (lm-format-enforcer's character-level JSON parser over the tokenizer's vocabulary). A reply
cut by ``max_tokens`` is still cut (``finish_reason: length``). Generation runs one request at a time
in a worker thread. A request whose
client has gone (it timed out and will retry, or gave up) is dropped: a queued one never starts, a running
one stops at its next token. Before, a CPU teacher slower than the client's deadline kept generating for
every abandoned attempt, so each retry queued behind dead work and none could finish.
"""

# No `from __future__ import annotations`: FastAPI must resolve the `Request` annotation of the
# handlers defined inside create_app(), which string annotations would hide.

import asyncio
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from ..errors import UserError


class SchemaDeadEnd(ValueError):
    """The reply's JSON schema admits no next token: lm-format-enforcer returned an empty allowed set. Seen with a
    ``pattern`` that needs a literal ``"`` inside a string (``'^a"b$'``: the JSON text would need ``\\"``, which the
    enforcer's regex does not take). Before, the request failed with HTTP 500: on an artifact the sampler turned
    an all ``-inf`` row into NaN probabilities ("Probabilities contain NaN"), and transformers' ``generate`` raised
    ValueError ("``prefix_allowed_tokens_fn`` returned an empty list"). Now generation stops and the server answers
    400 naming ``response_format`` and the text written so far."""

    def __init__(self, partial: str):
        self.partial = partial
        super().__init__(f"the JSON schema allows no next token after {partial[-200:]!r} (lm-format-enforcer found "
                         "none); the schema cannot be met as written: check 'pattern' (a literal quote inside a "
                         "JSON string needs escaping the enforcer does not do) or send type json_object")


def _render(tokenizer, messages: list[dict]) -> tuple[list[int], bool]:
    """Token ids of the prompt and whether the chat template was used."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding in some versions
            ids = ids["input_ids"]
        return list(ids), True
    text = "".join(f"{m.get('role', 'user')}: {m.get('content', '')}\n" for m in messages) + "assistant:"
    return tokenizer(text)["input_ids"], False


def _enforcer_vocabulary(tokenizer):
    """lm-format-enforcer's tokenizer data: each regular token's text, and whether it starts a word.

    Built here rather than with ``lmformatenforcer.integrations.transformers.build_token_enforcer_tokenizer_data``:
    that module imports ``PreTrainedTokenizerBase`` from ``transformers.tokenization_utils``, which transformers 5
    no longer has, and then reports "transformers is not installed" (lm-format-enforcer 0.11.3; fixed upstream by
    noamgat/lm-format-enforcer#175, not yet released). Same construction as that function: a token's text after a
    "0" token tells whether the tokenizer puts a space before it. ~2 s for SmolLM2's 49k tokens."""
    from lmformatenforcer.tokenenforcer import TokenEnforcerTokenizerData

    zero = tokenizer.encode("0", add_special_tokens=False)[-1]
    special = set(tokenizer.all_special_ids)
    size = len(tokenizer)
    regular = []
    for i in range(size):
        if i in special:
            continue
        after_zero = tokenizer.decode([zero, i])[1:]
        regular.append((i, after_zero, len(after_zero) > len(tokenizer.decode([i]))))

    def decode(ids):
        return tokenizer.decode(ids).rstrip("\ufffd")   # a partial multi-byte character is not text yet

    return TokenEnforcerTokenizerData(regular, decode, tokenizer.eos_token_id, False, size)


class LocalTeacher:
    """A loaded model + tokenizer and a lock (one generation at a time).

    ``model_dir``: a Hugging Face model directory (transformers, fp32, on ``device``), or an artifact that
    ``cdcda export`` wrote (``manifest.json``; its own runtime on the CPU, ``threads`` threads). An artifact
    teaches at the artifact's speed: on the real SmolLM2-135M-Instruct, a 2-core AVX2 VM, an ``onnx/int8-fast``
    export decoded at 57 tok/s on 2 threads (about 26 tok/s with the JSON filter), transformers' fp32 ``generate``
    at 7-8 tok/s on 1 thread with the other core busy (see README, "Cloud augmentation")."""

    def __init__(self, model_dir: str | Path, *, model_name: str | None = None, max_context: int | None = None,
                 device: str = "cpu", threads: int | None = None):
        model_dir = Path(model_dir)
        artifact = (model_dir / "manifest.json").is_file()
        if not artifact and not (model_dir / "config.json").is_file():
            raise UserError("neither a Hugging Face model directory (no config.json) nor an exported artifact "
                            "(no manifest.json)", file=str(model_dir),
                            expected="a directory written by save_pretrained, `cdcda init-model` or `cdcda export`",
                            hint=f"cdcda init-model --arch tiny --out {model_dir}")
        import torch
        from transformers import AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        self.model = self.runner = None
        if artifact:
            if device != "cpu":
                raise UserError(f"--device {device} applies to a Hugging Face model directory; an exported "
                                "artifact runs on its own runtime's CPU", field="--device", file=str(model_dir),
                                hint="leave --device out (and set --threads)")
            from ..runtime import load

            self.runner = load(model_dir, **({"threads": int(threads)} if threads else {}))
            cfg_max = int(self.runner.max_seq_len)
        else:
            from transformers import AutoModelForCausalLM

            if threads:
                torch.set_num_threads(int(threads))
            self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True).eval()
            try:
                self.model.to(device)
            except (RuntimeError, AssertionError, ValueError) as e:
                raise UserError(f"cannot use device {device!r}: {e}", field="--device",
                                expected="cpu, or a GPU torch can see (cuda, cuda:0, mps)",
                                hint="leave --device out to serve on the CPU") from None
            cfg_max = getattr(self.model.config, "max_position_embeddings", None) or 2048
        self.device = device
        self.name = model_name or model_dir.name
        self.max_context = min(int(max_context or cfg_max), int(cfg_max)) if artifact else int(max_context or cfg_max)
        self.created = int(time.time())
        self._lock = threading.Lock()
        self._vocab = None   # lm-format-enforcer's view of the tokenizer, built on the first JSON-mode request

    @staticmethod
    def format_schema(response_format: dict | None) -> dict | None:
        """The JSON schema ``response_format`` asks for (None: free text). Raises ValueError on a format that
        cannot be enforced; cheap, so the handler refuses a bad request before it queues."""
        if response_format is None:
            return None
        if not isinstance(response_format, dict):
            raise ValueError("response_format must be an object such as {\"type\": \"json_object\"}")
        kind = response_format.get("type", "text")
        if kind == "text":
            return None
        if kind == "json_object":
            return {"type": "object"}
        if kind == "json_schema":
            schema = ((response_format.get("json_schema") or {}).get("schema"))
            if not isinstance(schema, dict):
                raise ValueError("response_format json_schema needs json_schema.schema (an object)")
            return schema
        raise ValueError(f"response_format type {kind!r} is not supported; supported: text, json_object, "
                         "json_schema")

    def _enforcer(self, response_format: dict | None):
        """A token filter for ``response_format`` (None: free text); called under the generation lock (the
        tokenizer's data is built once, on the first JSON request: ~2 s for a 49k vocabulary)."""
        schema = self.format_schema(response_format)
        if schema is None:
            return None
        from lmformatenforcer import JsonSchemaParser, TokenEnforcer

        if self._vocab is None:
            self._vocab = _enforcer_vocabulary(self.tokenizer)
        return TokenEnforcer(self._vocab, JsonSchemaParser(schema))

    def complete(self, messages: list[dict], *, max_tokens: int = 256, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int | None = None, stop: list[str] | None = None,
                 cancel: threading.Event | None = None, response_format: dict | None = None) -> dict:
        """One completion. ``cancel``: once set, generation stops after the current token (a request that
        has not started yet does not start); the result's ``finish_reason`` is then ``cancelled``.
        ``response_format``: as OpenAI's (see the module docstring), enforced while generating."""
        torch = self.torch
        self.format_schema(response_format)   # a bad format fails before the request waits for the lock
        ids, templated = _render(self.tokenizer, messages)
        # The completion gets what the context leaves (at least 16 tokens); a prompt that still does
        # not fit keeps its end (the instruction). usage reports what was really used.
        budget = max(1, min(int(max_tokens), max(16, self.max_context - len(ids)), self.max_context - 1))
        if len(ids) + budget > self.max_context:
            ids = ids[-(self.max_context - budget):]
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        with self._lock, torch.inference_mode():
            if cancel is not None and cancel.is_set():   # the client left while this request waited
                return {"text": "", "prompt_tokens": len(ids), "completion_tokens": 0, "finish_reason": "cancelled",
                        "chat_template": templated}
            enforcer = self._enforcer(response_format)
            if self.runner is not None:
                out = self._sample(ids, budget, temperature, top_p, seed, eos, enforcer, cancel)
            else:
                out = self._generate(ids, budget, temperature, top_p, seed, eos, pad, enforcer, cancel)
        finish = "cancelled" if cancel is not None and cancel.is_set() else "length"
        if eos is not None and eos in out:
            out = out[: out.index(eos)]
            finish = "stop"
        text = self.tokenizer.decode(out, skip_special_tokens=True)
        for s in stop or []:
            if s and s in text:
                text, finish = text[: text.index(s)], "stop"
        return {"text": text, "prompt_tokens": len(ids), "completion_tokens": len(out), "finish_reason": finish,
                "chat_template": templated}

    def _allowed(self, enforcer, seq: list[int], n_prompt: int):
        """The tokens the JSON filter allows after ``seq`` (prompt + reply so far); :class:`SchemaDeadEnd` when none."""
        allowed = enforcer.get_allowed_tokens(seq).allowed_tokens
        if not len(allowed):
            raise SchemaDeadEnd(self.tokenizer.decode(seq[n_prompt:], skip_special_tokens=True))
        return allowed

    def _sample(self, ids, budget, temperature, top_p, seed, eos, enforcer, cancel) -> list[int]:
        """Sampling on an exported artifact: its runner's prefill, then one decode call per token (the KV-cache
        path the app runs); temperature and top-p as transformers applies them, the JSON filter first."""
        import numpy as np

        rng = np.random.default_rng(None if seed is None else int(seed))
        r = self.runner
        r.reset()
        logits = r.prefill(list(ids))[-1]
        out: list[int] = []
        for _ in range(budget):
            if cancel is not None and cancel.is_set():
                break
            x = np.asarray(logits, dtype=np.float64)
            if enforcer is not None:
                allowed = self._allowed(enforcer, list(ids) + out, len(ids))
                keep = np.full_like(x, -np.inf)
                keep[allowed] = x[allowed]
                x = keep
            if temperature and temperature > 0:
                x = x / float(temperature)
                prob = np.exp(x - x.max())
                prob /= prob.sum()
                if top_p and top_p < 1.0:
                    order = np.argsort(-prob, kind="stable")
                    n = int(np.searchsorted(np.cumsum(prob[order]), float(top_p))) + 1
                    kept = np.zeros_like(prob)
                    kept[order[:n]] = prob[order[:n]]
                    prob = kept / kept.sum()
                tok = int(rng.choice(prob.shape[0], p=prob))
            else:
                tok = int(np.argmax(x))
            out.append(tok)
            if (eos is not None and tok == eos) or len(out) == budget:
                break
            logits = r.decode(tok)
        return out

    def _generate(self, ids, budget, temperature, top_p, seed, eos, pad, enforcer, cancel) -> list[int]:
        """transformers' ``generate`` on the Hugging Face model."""
        torch = self.torch
        with torch.inference_mode():
            if seed is not None:
                torch.manual_seed(int(seed))
            inp = torch.tensor([ids], device=self.device)
            kwargs: dict[str, Any] = dict(max_new_tokens=budget, pad_token_id=pad, attention_mask=torch.ones_like(inp))
            if eos is not None:
                kwargs["eos_token_id"] = eos
            if enforcer is not None:
                kwargs["prefix_allowed_tokens_fn"] = lambda _batch, seq: self._allowed(enforcer, seq.tolist(), len(ids))
            if cancel is not None:
                from transformers import StoppingCriteria, StoppingCriteriaList

                class _Cancelled(StoppingCriteria):
                    def __call__(self, input_ids, scores, **kw):
                        return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool,
                                          device=input_ids.device)

                kwargs["stopping_criteria"] = StoppingCriteriaList([_Cancelled()])
            if temperature and temperature > 0:
                kwargs.update(do_sample=True, temperature=float(temperature), top_p=float(top_p or 1.0))
            else:
                kwargs.update(do_sample=False)
            return self.model.generate(inp, **kwargs)[0, len(ids):].tolist()


def create_app(teacher: LocalTeacher):
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import JSONResponse

    app = FastAPI(title="cdcda serve-teacher", version="1")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": teacher.name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": teacher.name, "object": "model", "created": teacher.created,
                                            "owned_by": "local"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        try:
            body = await request.json()
        except ValueError:
            raise HTTPException(400, "body is not JSON") from None
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
            return JSONResponse({"error": {"message": "messages must be a non-empty list of {role, content}",
                                           "type": "invalid_request_error", "param": "messages"}}, status_code=400)
        if body.get("stream"):
            return JSONResponse({"error": {"message": "stream=true is not supported by serve-teacher",
                                           "type": "invalid_request_error", "param": "stream"}}, status_code=400)
        if body.get("model") not in (None, teacher.name):
            return JSONResponse({"error": {"message": f"model {body.get('model')!r} not found; this server has "
                                           f"{teacher.name!r}", "type": "invalid_request_error", "param": "model"}},
                                status_code=404)
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else (stop or [])
        fmt = body.get("response_format")
        try:
            teacher.format_schema(fmt)   # refuse an unsupported format before queueing
        except (ValueError, TypeError, AttributeError) as e:
            return JSONResponse({"error": {"message": f"response_format: {e}", "type": "invalid_request_error",
                                           "param": "response_format"}}, status_code=400)
        cancel, done = threading.Event(), asyncio.Event()

        async def watch():   # the client closed the connection (its deadline passed): stop the work
            while not done.is_set():
                if await request.is_disconnected():
                    cancel.set()
                    return
                try:
                    await asyncio.wait_for(done.wait(), 0.5)
                except asyncio.TimeoutError:
                    pass

        watcher = asyncio.create_task(watch())
        try:
            r = await asyncio.to_thread(
                teacher.complete, [{"role": m.get("role", "user"), "content": str(m.get("content") or "")}
                                   for m in msgs],
                max_tokens=int(body.get("max_tokens") or body.get("max_completion_tokens") or 256),
                temperature=float(body.get("temperature", 1.0) if body.get("temperature") is not None else 1.0),
                top_p=float(body.get("top_p") or 1.0), seed=body.get("seed"), stop=stop, cancel=cancel,
                response_format=fmt)
        except SchemaDeadEnd as e:
            return JSONResponse({"error": {"message": f"response_format: {e}", "type": "invalid_request_error",
                                           "param": "response_format"}}, status_code=400)
        finally:
            done.set()
            await watcher
        if r["finish_reason"] == "cancelled":   # nobody reads this; 499 as nginx logs a client that left
            return JSONResponse({"error": {"message": "the client closed the connection; generation stopped",
                                           "type": "cancelled"}}, status_code=499)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": teacher.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": r["text"]},
                         "finish_reason": r["finish_reason"]}],
            "usage": {"prompt_tokens": r["prompt_tokens"], "completion_tokens": r["completion_tokens"],
                      "total_tokens": r["prompt_tokens"] + r["completion_tokens"]},
        }

    return app


def serve(model_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
          max_context: int | None = None, device: str = "cpu", threads: int | None = None,
          log_level: str = "info") -> None:
    """Load the model and serve until interrupted (blocking)."""
    import uvicorn

    teacher = LocalTeacher(model_dir, model_name=model_name, max_context=max_context, device=device,
                           threads=threads)
    uvicorn.run(create_app(teacher), host=host, port=port, log_level=log_level)
