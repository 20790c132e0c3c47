"""``cdcda serve-teacher``: any local Hugging Face causal LM behind an OpenAI-compatible API.

FastAPI + uvicorn. Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` (non-streaming;
the tokenizer's chat template when it has one, else ``role: content`` lines), ``GET /health``.
``usage`` counts real tokens. ``response_format`` is accepted: ``json_object`` cannot be enforced
on an arbitrary local model, so the reply is whatever the model writes (the client's parser and
re-ask budget deal with it). Generation runs one request at a time in a worker thread. A request whose
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


def _render(tokenizer, messages: list[dict]) -> tuple[list[int], bool]:
    """Token ids of the prompt and whether the chat template was used."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding in some versions
            ids = ids["input_ids"]
        return list(ids), True
    text = "".join(f"{m.get('role', 'user')}: {m.get('content', '')}\n" for m in messages) + "assistant:"
    return tokenizer(text)["input_ids"], False


class LocalTeacher:
    """A loaded model + tokenizer and a lock (one generation at a time)."""

    def __init__(self, model_dir: str | Path, *, model_name: str | None = None, max_context: int | None = None,
                 device: str = "cpu"):
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise UserError("not a Hugging Face model directory (no config.json)", file=str(model_dir),
                            expected="a directory written by save_pretrained or `cdcda init-model`",
                            hint=f"cdcda init-model --arch tiny --out {model_dir}")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True).eval()
        try:
            self.model.to(device)
        except (RuntimeError, AssertionError, ValueError) as e:
            raise UserError(f"cannot use device {device!r}: {e}", field="--device",
                            expected="cpu, or a GPU torch can see (cuda, cuda:0, mps)",
                            hint="leave --device out to serve on the CPU") from None
        self.device = device
        self.name = model_name or model_dir.name
        cfg_max = getattr(self.model.config, "max_position_embeddings", None) or 2048
        self.max_context = int(max_context or cfg_max)
        self.created = int(time.time())
        self._lock = threading.Lock()

    def complete(self, messages: list[dict], *, max_tokens: int = 256, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int | None = None, stop: list[str] | None = None,
                 cancel: threading.Event | None = None) -> dict:
        """One completion. ``cancel``: once set, generation stops after the current token (a request that
        has not started yet does not start); the result's ``finish_reason`` is then ``cancelled``."""
        torch = self.torch
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
            if seed is not None:
                torch.manual_seed(int(seed))
            inp = torch.tensor([ids], device=self.device)
            kwargs: dict[str, Any] = dict(max_new_tokens=budget, pad_token_id=pad, attention_mask=torch.ones_like(inp))
            if eos is not None:
                kwargs["eos_token_id"] = eos
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
            out = self.model.generate(inp, **kwargs)[0, len(ids):].tolist()
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
                top_p=float(body.get("top_p") or 1.0), seed=body.get("seed"), stop=stop, cancel=cancel)
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
          max_context: int | None = None, device: str = "cpu", log_level: str = "info") -> None:
    """Load the model and serve until interrupted (blocking)."""
    import uvicorn

    teacher = LocalTeacher(model_dir, model_name=model_name, max_context=max_context, device=device)
    uvicorn.run(create_app(teacher), host=host, port=port, log_level=log_level)
