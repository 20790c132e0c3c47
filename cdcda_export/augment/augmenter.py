"""Augment every user of a LaMP file: ask a teacher for synthetic examples, filter, write per user.

Output layout (``OUT``)::

    run.json                   settings that shape the outputs (a rerun must match, or --overwrite)
    cache/ab/<sha256>.json     one teacher reply per file (atomic); a rerun never re-asks these
    audit.jsonl                per request sent: hashes of what left the machine, never the content
    <user>/report.json         per-user counts (written before synthetic.jsonl)
    <user>/synthetic.jsonl     kept examples, one JSON object per line: {"input","output","provenance"};
                               written by atomic rename when the user is complete (its presence
                               is the completion marker)
    augment_report.json        requests, retries, failures, tokens, kept per user, filter counts

A run killed at any moment (Ctrl-C, SIGTERM, even SIGKILL) leaves only complete cache entries and
complete user files; rerunning the same command resumes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import logging
import math
import os
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import UserError
from ..utils import is_safe_name, now_iso, write_json_atomic
from .cache import ResponseCache, cache_key
from .codec import Codec
from .filters import FILTER_NAMES, FilterSettings, apply_filters, length_bounds
from .offline import offline_examples
from .parsing import MalformedReply, parse_examples
from .privacy import AuditLog, Redactor, sha256_text
from .prompts import PromptTemplate, load_template

log = logging.getLogger("cdcda.augment")

TEACHERS = ("openai", "offline")
REPORT_NAME = "augment_report.json"
SYNTHETIC_NAME = "synthetic.jsonl"


@dataclass
class AugmentConfig:
    task: str
    questions: Path
    out: Path
    outputs: Path | None = None
    teacher: str = field(default="offline", metadata={"choices": TEACHERS})
    base_url: str | None = None
    model: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    per_user: int = 8                 # examples to keep per user (at most)
    per_request: int = 4              # examples asked for in one request
    oversample: float = 2.0           # ask for per_user * oversample candidates (filters drop some)
    shots: int = 4                    # few-shot examples per request, sampled from the profile
    concurrency: int = 4
    max_requests: int | None = None   # new teacher requests this run (re-asks count; retries do not)
    max_reasks: int = 2               # re-asks of one request after malformed replies
    temperature: float = 0.8
    top_p: float | None = None
    max_tokens: int = 1024
    timeout: float = 60.0
    max_retries: int = 5
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    # auto: the reply's JSON schema (json_schema), else json_object, else none, as the server accepts;
    # on: json_object only; schema: json_schema only; off: plain text
    json_mode: str = field(default="auto", metadata={"choices": ("auto", "on", "schema", "off")})
    redact: bool = True
    redact_names: bool = True
    max_profile_items: int | None = 32
    seed: int = 0
    users: list[str] | None = None
    max_users: int | None = None
    overwrite: bool = False
    filters: FilterSettings = field(default_factory=FilterSettings)

    def check(self) -> None:
        problems = []
        if self.teacher not in TEACHERS:
            problems.append(f"--teacher {self.teacher!r} is not allowed; allowed: {', '.join(TEACHERS)}")
        if self.teacher == "openai":
            if not self.base_url:
                problems.append("--base-url is required with --teacher openai (e.g. https://api.openai.com/v1 "
                                "or http://127.0.0.1:8000/v1)")
            if not self.model:
                problems.append("--model is required with --teacher openai (a name the server lists at /v1/models)")
        for name in ("per_user", "per_request", "shots", "concurrency"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_requests is not None and self.max_requests < 0:
            problems.append(f"--max-requests must be >= 0, got {self.max_requests}")
        if self.max_profile_items is not None and self.max_profile_items < 1:
            problems.append(f"--max-profile-items must be >= 1, got {self.max_profile_items}")
        if self.oversample < 1:
            problems.append(f"--oversample must be >= 1, got {self.oversample}")
        if problems:
            from ..errors import ValidationErrors

            raise ValidationErrors(problems, hint="cdcda augment --help")

    def fingerprint(self, template: PromptTemplate | None) -> dict:
        """Settings that shape the outputs; a resume with different ones would mix two runs."""
        keep = ("task", "teacher", "model", "per_user", "per_request", "oversample", "shots", "max_reasks",
                "temperature", "top_p", "max_tokens", "redact", "redact_names", "max_profile_items", "seed")
        fp = {k: getattr(self, k) for k in keep}
        fp["filters"] = asdict(self.filters)
        fp["template"] = template.version if template else None
        fp["template_sha256"] = template.sha256 if template else None
        return fp


class BudgetExhausted(Exception):
    pass


@dataclass
class RunStats:
    cache_hits: int = 0
    malformed: int = 0
    reasks: int = 0
    reasks_after_cut: int = 0         # of ``reasks``: replies cut at max_tokens, asked again from the first prompt
    malformed_gave_up: int = 0
    failed_requests: int = 0
    budget_exhausted: bool = False


def _folder(uid: str) -> str:
    return uid if is_safe_name(uid) else f"user-{hashlib.sha256(uid.encode()).hexdigest()[:16]}"


def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(json.dumps(parts, default=str).encode()).digest()[:8], "big")


def _write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def safe_url(url: str | None) -> str | None:
    """``url`` without user-info or query string (where secrets hide) for reports and the audit log."""
    if not url:
        return url
    from urllib.parse import urlsplit, urlunsplit

    p = urlsplit(url)
    host = p.hostname or ""
    netloc = f"{host}:{p.port}" if p.port else host
    return urlunsplit((p.scheme, netloc, p.path, "", ""))


def resolve_api_key(env_name: str, *, explicit: bool) -> str | None:
    """The API key from the environment variable ``env_name`` (never from a flag, never stored)."""
    key = os.environ.get(env_name)
    if not key and explicit:
        raise UserError(f"environment variable {env_name} is not set", field="--api-key-env",
                        expected="the name of a variable holding the API key",
                        hint=f"export {env_name}=... and re-run the same command")
    return key or None


class Augmenter:
    """One augmentation run over a dataset (see module docstring for the files it writes)."""

    def __init__(self, cfg: AugmentConfig, *, api_key: str | None = None,
                 progress: Callable[[str, dict], None] | None = None):
        cfg.check()
        self.cfg = cfg
        self.out = Path(cfg.out)
        self._api_key = api_key
        self.progress = progress or (lambda uid, rep: None)
        from ..data import get_task

        try:
            self.task = get_task(cfg.task)
        except UserError:
            raise
        except (KeyError, ValueError) as e:
            raise UserError(f"unknown task {cfg.task!r} ({e})", field="--task",
                            expected="a LaMP task name such as LaMP-3", hint="cdcda augment --help") from None
        self.labels = list(self.task.labels) if getattr(self.task, "labels", None) else None
        self.codec = Codec(getattr(self.task, "question_template", None))
        self.template = (load_template(self.task.name, self.labels, self.codec.slots)
                         if cfg.teacher == "openai" else None)
        self._all_profiles: dict[str, list[dict]] = {}
        self.cache = ResponseCache(self.out / "cache")
        self.audit = AuditLog(self.out / "audit.jsonl")
        self.stats = RunStats()
        self.client = None
        self._sent = 0
        self._filter_pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="augment-filter")

    # ------------------------------------------------------------------ teacher side
    def _gen_params(self) -> dict:
        c = self.cfg
        return {"temperature": c.temperature, "top_p": c.top_p, "max_tokens": c.max_tokens, "json_mode": c.json_mode}

    def reply_schema(self, bounds: tuple[int, int, int, int] | None = None,
                     slot_bounds: dict[str, tuple[int, int]] | None = None) -> dict:
        """The JSON schema of a teacher reply: ``{"examples": [{"input", "output"}]}``, at most ``per_request``
        examples, the output one of the task's labels on a classification task, each string within the length
        filter's bounds for this user (``bounds``: :func:`length_bounds` of the user's real pairs), so a grammar
        cannot write what the filter rejects (a 135M teacher otherwise runs one input on until max_tokens). Sent
        as ``response_format`` (see :meth:`OpenAIChatClient.chat`); the filters still check every example.
        A multi-slot question's input is an object with one string per slot (``slot_bounds``: each slot's
        length bounds, :meth:`.codec.Codec.slot_bounds`), put back into the question by :meth:`_candidate`."""
        f = self.cfg.filters
        lo_i, hi_i, lo_o, hi_o = bounds or (f.min_input_chars, f.max_input_chars, 1, f.max_output_chars)
        out = ({"type": "string", "enum": list(self.labels)} if self.labels
               else {"type": "string", "minLength": lo_o, "maxLength": hi_o})
        inp = {"type": "string", "minLength": lo_i, "maxLength": hi_i}
        if not self.codec.single:
            spans = {n: (slot_bounds or {}).get(n, (1, hi_i)) for n in self.codec.slots}
            inp = {"type": "object", "properties": {n: {"type": "string", "minLength": lo, "maxLength": hi}
                                                    for n, (lo, hi) in spans.items()},
                   "required": list(self.codec.slots), "additionalProperties": False}
        item = {"type": "object", "properties": {"input": inp, "output": out},
                "required": ["input", "output"], "additionalProperties": False}
        return {"type": "object", "properties": {"examples": {"type": "array", "items": item, "minItems": 1,
                                                              "maxItems": self.cfg.per_request}},
                "required": ["examples"], "additionalProperties": False}

    async def _ask(self, uid: str, r: int, messages: list[dict], schema: dict | None = None) -> tuple[list, dict]:
        """Candidates for request ``r`` of user ``uid`` (from the cache, or the teacher)."""
        c, t = self.cfg, self.template
        msgs = list(messages)
        usage_total = Counter()
        keys = []
        malformed = 0
        cut_reasks = 0
        for attempt in range(c.max_reasks + 1):
            # A re-ask after a cut reply sends the first prompt again, so it needs its own seed: a seeded teacher
            # would otherwise repeat the reply that ran to max_tokens token for token.
            seed = _seed(c.seed, uid, r) if not cut_reasks else _seed(c.seed, uid, r, "cut", cut_reasks)
            key = cache_key(template=t.version, template_sha256=t.sha256, model=c.model, params={**self._gen_params(), "reply_schema": sha256_text(json.dumps(schema, sort_keys=True))},
                            messages=msgs, attempt=attempt, seed=seed)
            keys.append(key)
            entry = self.cache.get(key)
            if entry is not None:
                self.stats.cache_hits += 1
            else:
                if c.max_requests is not None and self._sent >= c.max_requests:
                    self.stats.budget_exhausted = True
                    raise BudgetExhausted()
                self._sent += 1
                body_sha = sha256_text(json.dumps(msgs, sort_keys=True, ensure_ascii=False))
                self.audit.record(ts=now_iso(), user=uid, request=r, attempt=attempt, cache_key=key,
                                  messages_sha256=body_sha, bytes=len(json.dumps(msgs).encode()),
                                  model=c.model, base_url=safe_url(c.base_url))
                reply = await self.client.chat(msgs, temperature=c.temperature, max_tokens=c.max_tokens,
                                               top_p=c.top_p, seed=seed % (2**31), schema=schema)
                entry = {"key": key, "content": reply.content, "usage": reply.usage, "model": reply.model,
                         "finish_reason": reply.finish_reason, "json_mode": reply.json_mode,
                         "messages_sha256": body_sha, "created_at": now_iso()}
                self.cache.put(key, entry)
            usage_total.update(entry.get("usage") or {})
            try:
                items = parse_examples(entry.get("content"))
            except MalformedReply as e:
                self.stats.malformed += 1
                malformed += 1
                if attempt < c.max_reasks:
                    self.stats.reasks += 1
                    if entry.get("finish_reason") == "length":
                        # Cut at max_tokens (typically a small teacher looping inside one JSON string): there is
                        # nothing to correct, and carrying the cut reply into the conversation grows every
                        # re-ask by max_tokens until it overflows the teacher's context (seen with a 2,048-token
                        # artifact teacher: prompts of 440 -> 1,508 -> 2,032 tokens). Ask the first prompt again.
                        self.stats.reasks_after_cut += 1
                        cut_reasks += 1
                        msgs = list(messages)
                    else:
                        msgs = msgs + [{"role": "assistant", "content": (entry.get("content") or "")[:4000]},
                                       t.reask_message(str(e), c.per_request)]
                continue
            meta = {"model": entry.get("model"), "request": keys[-1][:16], "attempts": attempt + 1}
            return items, {"usage": dict(usage_total), "meta": meta, "replies": attempt + 1, "malformed": malformed}
        self.stats.malformed_gave_up += 1
        return [], {"usage": dict(usage_total), "meta": None, "malformed_gave_up": True,
                    "replies": c.max_reasks + 1, "malformed": malformed}

    def _candidate(self, item):
        """A reply item as the filters take it: a multi-slot input object becomes the task's question (an object
        that does not fill the template is left as it is, and the schema filter rejects it)."""
        if not self.codec.single and isinstance(item, dict) and isinstance(item.get("input"), dict):
            question = self.codec.from_fields(item["input"])
            if question is not None:
                return {**item, "input": question}
        return item

    def _shot(self, pair: tuple[str, str]) -> tuple:
        """A real pair as the teacher sees it: a multi-slot question as its ``{slot: text}`` object."""
        if self.codec.single:
            return pair
        return (self.codec.fields(pair[0]) or pair[0], pair[1])

    # ------------------------------------------------------------------ per user
    def _profile_items(self, user) -> list[dict]:
        items = list(user.profile or [])
        n = self.cfg.max_profile_items
        if n is not None and len(items) > n:
            rng = random.Random(_seed(self.cfg.seed, user.id, "profile"))
            items = rng.sample(items, n)
        return items

    def _others(self, uid: str, redactor: Redactor | None) -> list[dict]:
        """Profile items of other users (LaMP-1 builds its negative references from them)."""
        if self.task.name != "LaMP-1":
            return []
        pool = [it for other, items in sorted(self._all_profiles.items()) if other != uid for it in items]
        rng = random.Random(_seed(self.cfg.seed, uid, "others"))
        pool = rng.sample(pool, min(len(pool), 256))
        return [redactor.redact_item(it) for it in pool] if redactor is not None else pool

    def _real_pairs(self, items: list[dict], tag: str, uid: str, others: list[dict]) -> list[tuple[str, str]]:
        """(teacher-facing input, output) pairs built from profile ``items``."""
        rng = random.Random(_seed(self.cfg.seed, uid, tag))
        return [(self.codec.unwrap(str(p[0])), str(p[1])) for p in self.task.profile_pairs(items, rng, others)]

    async def _user(self, user) -> dict:
        c = self.cfg
        uid = str(user.id)
        udir = self.out / _folder(uid)
        real = self._real_pairs(list(user.profile or []), "real", uid, self._others(uid, None))
        rep: dict[str, Any] = {"user_id": uid, "real_examples": len(real), "requests": 0, "failed_requests": 0,
                               "malformed_gave_up": 0, "tokens": {}, "candidates": 0}
        candidates: list[tuple[dict, dict]] = []
        target_candidates = math.ceil(c.per_user * c.oversample)
        if c.teacher == "offline":
            items = offline_examples(real, target_candidates, seed=_seed(c.seed, uid, "offline"),
                                     classification=bool(self.labels), editable=self.codec.editable)
            base = {"teacher": "offline", "model": None, "template": "offline-eda@v1"}
            candidates = [(it, dict(base, op=it.pop("op"))) for it in items]
            rep["requests"] = 0
        else:
            redactor = Redactor(names=c.redact_names)
            shared_items = self._profile_items(user)
            if c.redact:
                shared_items = [redactor.redact_item(it) for it in shared_items]
            shared = self._real_pairs(shared_items, "shared", uid,
                                      self._others(uid, redactor if c.redact else None))
            rep["profile_items_shared"] = len(shared_items)
            rep["redactions"] = dict(redactor.counts)
            n_req = math.ceil(target_candidates / c.per_request) if shared else 0
            rep["requests"] = n_req
            if not shared:
                rep["note"] = "no usable profile pairs to show the teacher: nothing asked"
            schema = self.reply_schema(length_bounds(real, c.filters),
                                       None if self.codec.single else self.codec.slot_bounds(
                                           [i for i, _ in real], c.filters.length_ratio, c.filters.max_input_chars))

            async def one(r: int):
                rng = random.Random(_seed(c.seed, uid, "shots", r))
                shots = [self._shot(p) for p in rng.sample(shared, min(c.shots, len(shared)))]
                try:
                    return await self._ask(uid, r, self.template.messages(shots, c.per_request), schema)
                except BudgetExhausted:
                    return None
                except Exception as e:  # TeacherRequestFailed, or an unexpected reply shape
                    from .client import TeacherRequestFailed

                    if not isinstance(e, TeacherRequestFailed):
                        raise
                    log.warning("user %s request %d failed: %s", uid, r, e)
                    return e

            results = await asyncio.gather(*(one(r) for r in range(n_req)))
            tokens = Counter()
            incomplete = False
            for res in results:
                if res is None:
                    incomplete = True
                    continue
                if isinstance(res, Exception):
                    rep["failed_requests"] += 1
                    self.stats.failed_requests += 1
                    incomplete = True
                    continue
                items, info = res
                tokens.update(info["usage"])
                rep["teacher_replies"] = rep.get("teacher_replies", 0) + info["replies"]
                rep["malformed_replies"] = rep.get("malformed_replies", 0) + info["malformed"]
                if info.get("malformed_gave_up"):
                    rep["malformed_gave_up"] += 1
                    continue
                prov = {"teacher": "openai", "model": info["meta"]["model"], "template": self.template.version,
                        "template_sha256": self.template.sha256, "request": info["meta"]["request"]}
                candidates += [(self._candidate(it), prov) for it in items]
            rep["tokens"] = dict(tokens)
            if incomplete:
                rep["status"] = "incomplete"
                return rep

        rep["candidates"] = len(candidates)
        loop = asyncio.get_running_loop()
        fres = await loop.run_in_executor(
            self._filter_pool, lambda: apply_filters([it for it, _ in candidates], real, labels=self.labels,
                                                     parse=getattr(self.task, "parse", None),
                                                     settings=c.filters, target=c.per_user,
                                                     input_ok=lambda t: self.codec.wrap(t) is not None,
                                                     view=self.codec.view))
        # Map kept examples back to their provenance (filters keep input/output text).
        prov_of = {}
        for it, prov in candidates:
            if isinstance(it, dict) and isinstance(it.get("input"), str):
                prov_of.setdefault(it["input"].strip(), prov)
        rows = []
        created = now_iso()
        for ex in fres.kept:
            prov = dict(prov_of.get(ex["input"], {}), user_id=uid, seed=c.seed, filter_scores=ex["scores"],
                        created_at=created)
            rows.append({"input": self.codec.wrap(ex["input"]), "output": ex["output"], "provenance": prov})
        rep.update(kept=len(rows), filters=fres.counts(), status="complete",
                   label_counts=dict(Counter(r["output"] for r in rows)) if self.labels else None)
        write_json_atomic(udir / "report.json", rep)
        _write_jsonl_atomic(udir / SYNTHETIC_NAME, rows)  # last: its presence marks the user complete
        return rep

    # ------------------------------------------------------------------ whole run
    def _check_run_file(self) -> None:
        fp = self.cfg.fingerprint(self.template)
        p = self.out / "run.json"
        if p.exists():
            try:
                old = json.loads(p.read_text(encoding="utf-8")).get("fingerprint")
            except (json.JSONDecodeError, OSError):
                old = None
            if old is not None and old != json.loads(json.dumps(fp, default=str)) and not self.cfg.overwrite:
                diff = sorted(k for k in set(old) | set(fp) if old.get(k) != json.loads(json.dumps(fp, default=str)).get(k))
                raise UserError(f"{self.out} holds a run with different settings ({', '.join(diff)})",
                                file=str(p), expected="the same settings to resume",
                                hint="use a new --out, or add --overwrite to redo every user (cached teacher "
                                     "replies are reused)")
        write_json_atomic(p, {"fingerprint": fp, "updated_at": now_iso()})

    def _load_users(self):
        from ..data import load_lamp

        ds = load_lamp(self.cfg.task, self.cfg.questions, self.cfg.outputs)
        users = list(ds.users)
        self._all_profiles = {str(u.id): list(u.profile or []) for u in users}
        if self.cfg.users:
            wanted = set(map(str, self.cfg.users))
            users = [u for u in users if str(u.id) in wanted]
            missing = wanted - {str(u.id) for u in users}
            if missing:
                raise UserError(f"users not in the questions file: {sorted(missing)[:10]}", file=str(self.cfg.questions),
                                field="--user", expected="ids present in the file")
        if self.cfg.max_users is not None:
            users = users[: self.cfg.max_users]
        return users

    async def run(self) -> dict:
        c = self.cfg
        users = self._load_users()
        self.out.mkdir(parents=True, exist_ok=True)
        self._check_run_file()
        for stale in list(self.out.glob(".*.tmp")) + list(self.out.glob("*/.*.tmp")) + list(self.out.glob("cache/*/.*.tmp")):
            stale.unlink(missing_ok=True)  # temp files of a killed run (never renamed into place)
        started, t0 = now_iso(), time.monotonic()
        reports: dict[str, dict] = {}
        todo = []
        for u in users:
            udir = self.out / _folder(str(u.id))
            if (udir / SYNTHETIC_NAME).exists() and not c.overwrite:
                try:
                    reports[str(u.id)] = dict(json.loads((udir / "report.json").read_text(encoding="utf-8")),
                                              resumed=True)
                    continue
                except (OSError, json.JSONDecodeError):
                    pass  # report missing: redo the user (cached replies make it cheap)
            todo.append(u)
        status = "complete"
        from .client import ClientStats, OpenAIChatClient

        cstats = ClientStats()
        try:
            if c.teacher == "openai":
                self.client = OpenAIChatClient(
                    c.base_url, c.model, api_key=self._api_key, timeout=c.timeout, concurrency=c.concurrency,
                    max_retries=c.max_retries, backoff_initial=c.backoff_initial, backoff_max=c.backoff_max,
                    json_mode=c.json_mode, stats=cstats)
            user_sem = asyncio.Semaphore(max(2, c.concurrency))

            async def guarded(u):
                async with user_sem:
                    rep = await self._user(u)
                    reports[str(u.id)] = rep
                    self.progress(str(u.id), rep)

            await asyncio.gather(*(guarded(u) for u in todo))
        except (asyncio.CancelledError, KeyboardInterrupt):
            status = "interrupted"
            raise
        finally:
            if self.client is not None:
                await self.client.aclose()
            self._filter_pool.shutdown(wait=True)
            if status != "interrupted":
                if any(r.get("status") != "complete" for r in reports.values()) or len(reports) < len(users):
                    status = "budget_exhausted" if self.stats.budget_exhausted else "incomplete"
            report = self._report(users, reports, cstats, status, started, time.monotonic() - t0)
            write_json_atomic(self.out / REPORT_NAME, report)
        return report

    def _report(self, users, reports, cstats, status, started, seconds) -> dict:
        c = self.cfg
        filters = Counter()
        tokens = Counter()
        kept, cands, replies, malformed = {}, 0, 0, 0
        for uid, r in reports.items():
            filters.update(r.get("filters") or {})
            tokens.update(r.get("tokens") or {})
            if r.get("status") == "complete":
                kept[uid] = r.get("kept", 0)
            cands += r.get("candidates", 0)
            replies += r.get("teacher_replies", 0)
            malformed += r.get("malformed_replies", 0)
        this_run = cstats.as_dict()
        this_run.update(asdict(self.stats))
        return {
            "status": status, "task": c.task, "teacher": c.teacher, "model": c.model, "base_url": safe_url(c.base_url),
            "template": self.template.version if self.template else "offline-eda@v1",
            "template_sha256": self.template.sha256 if self.template else None,
            "questions": str(c.questions), "out": str(self.out), "started_at": started, "finished_at": now_iso(),
            "seconds": round(seconds, 3),
            "users": {"total": len(users), "complete": len(kept),
                      "incomplete": sorted(str(u.id) for u in users if str(u.id) not in kept)},
            # This run's traffic (cache hits cost nothing; retries are extra HTTP attempts).
            "requests": this_run["requests"], "retries": this_run["retries"], "failures": this_run["failures"],
            "this_run": this_run,
            # Tokens over every reply the kept outputs are built from (cached replies included).
            "tokens": {k: int(tokens.get(k, 0)) for k in ("prompt_tokens", "completion_tokens", "total_tokens")},
            # Over every reply the outputs are built from (cached replies included, as tokens).
            "teacher_replies": replies, "malformed_replies": malformed,
            "candidates": cands,
            "kept_total": sum(kept.values()), "kept_per_user": kept,
            "filters": {name: int(filters.get(name, 0)) for name in FILTER_NAMES},
            "settings": {k: (str(v) if isinstance(v, Path) else safe_url(v) if k == "base_url" else v)
                         for k, v in asdict(c).items()},
            "per_user": reports,
        }


class Interrupted(Exception):
    """The run was stopped by SIGTERM/SIGINT; everything written so far is complete and resumable."""


def run_augment(cfg: AugmentConfig, *, api_key: str | None = None, progress=None) -> dict:
    """Synchronous entry point (the CLI and the benchmark call this).

    SIGTERM is turned into a cancellation of the run (like Ctrl-C), so the report is written with
    ``status: interrupted`` before the process exits; raises :class:`Interrupted`.
    """
    import signal
    import threading

    augmenter = Augmenter(cfg, api_key=api_key, progress=progress)

    async def main() -> dict:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        if threading.current_thread() is threading.main_thread():
            loop.add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            return await augmenter.run()
        finally:
            if threading.current_thread() is threading.main_thread():
                loop.remove_signal_handler(signal.SIGTERM)

    try:
        return asyncio.run(main())
    except (asyncio.CancelledError, KeyboardInterrupt):
        raise Interrupted(f"interrupted; completed users and cached replies are kept in {cfg.out}") from None


def read_synthetic(path: str | Path) -> list[dict]:
    """Rows of one ``synthetic.jsonl`` (for training)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"line {n} is not JSON ({e.msg})", file=str(path),
                                expected='{"input": ..., "output": ..., "provenance": {...}} per line') from None
    return rows
