"""Unit tests: the redactor, the audit log, what leaves the machine, and the CLI's user errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cdcda_export.augment import AugmentConfig, FilterSettings, run_augment
from cdcda_export.augment.privacy import AuditLog, Redactor, find_identifiers
from cdcda_export.data import sample_paths

CLI = [sys.executable, "-c", "from cdcda_export.cli import main; main()"]


@pytest.mark.parametrize("text,expected", [
    ("write to jane.doe+shop@mail.example.co.uk today", "write to [EMAIL] today"),
    ("see https://example.com/a?b=1 and www.shop.example.org.", "see [URL] and [URL]."),
    ("call +1 (555) 123-4567 or 555-1234 now", "call [PHONE] or [PHONE] now"),
    ("call 020 7946 0958 after six", "call [PHONE] after six"),
    ("thanks @bread_lover for the tip", "thanks [HANDLE] for the tip"),
    ("I met Dr. Watson at the cafe", "I met [NAME] at the cafe"),
    ("yesterday I met John Smith at the bakery", "yesterday I met [NAME] at the bakery"),
])
def test_redactor_replaces_identifiers(text, expected):
    assert Redactor().redact(text) == expected


@pytest.mark.parametrize("text", [
    "The bread was great. Monday was busy.",      # capitalized words at sentence start / weekdays
    "Scores from 1999-2001 and 2010 were fine.",  # years and ranges are not phone numbers
    "Rated 4 out of 5, would buy 2 more.",
    "[1] or [2]",                                 # LaMP-1 labels survive
    "sci-fi, based on a book",                    # LaMP-2 tags survive
])
def test_redactor_leaves_ordinary_text_alone(text):
    assert Redactor().redact(text) == text


def test_redactor_counts_and_name_switch():
    r = Redactor(names=False)
    out = r.redact_item({"id": "u1@x.io", "text": "mail a@b.io, ask Anna Berg", "score": 5})
    assert out == {"id": "u1@x.io", "text": "mail [EMAIL], ask Anna Berg", "score": 5}   # id untouched
    assert dict(r.counts) == {"email": 1}
    kinds = {k for k, _ in find_identifiers("a@b.io https://x.y @hey 555-123-4567 [NAME]")}
    assert kinds == {"email", "url", "handle", "phone", "placeholder"}


def test_audit_log_is_append_only_jsonl(tmp_path):
    log = AuditLog(tmp_path / "a" / "audit.jsonl")
    log.record(user="u", messages_sha256="ab" * 32)
    log.record(user="v", messages_sha256="cd" * 32)
    rows = [json.loads(x) for x in (tmp_path / "a" / "audit.jsonl").read_text().splitlines()]
    assert [r["user"] for r in rows] == ["u", "v"]


def test_cli_user_errors(tmp_path):
    q = sample_paths("LaMP-3")[0]

    def cli(*args, env=None):
        import os

        e = dict(os.environ)
        e.pop("OPENAI_API_KEY", None)
        e.update(env or {})
        return subprocess.run(CLI + list(args), capture_output=True, text=True, env=e, timeout=120)

    r = cli("augment", "--task", "LaMP-3", "--questions", q, "--out", str(tmp_path / "o"), "--teacher", "openai")
    assert r.returncode == 2 and "--base-url is required" in r.stderr and "Traceback" not in r.stderr
    r = cli("augment", "--task", "LaMP-3", "--questions", q, "--out", str(tmp_path / "o"), "--teacher", "openai",
            "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--api-key-env", "MY_KEY_VAR")
    assert r.returncode == 2 and "MY_KEY_VAR is not set" in r.stderr and "export MY_KEY_VAR" in r.stderr
    r = cli("augment", "--task", "LaMP-9", "--questions", q, "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "LaMP-9" in r.stderr and "Traceback" not in r.stderr
    r = cli("augment", "--task", "LaMP-3", "--questions", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "missing.json" in r.stderr and "Traceback" not in r.stderr


def test_changed_settings_do_not_mix_with_a_previous_run(tmp_path):
    from cdcda_export.errors import UserError

    q = Path(sample_paths("LaMP-3")[0])
    base = dict(task="LaMP-3", questions=q, out=tmp_path / "o", max_users=1,
                filters=FilterSettings(min_relevance=None))
    rep = run_augment(AugmentConfig(**base, per_user=2))
    assert rep["status"] == "complete" and rep["kept_total"] <= 2
    with pytest.raises(UserError, match="different settings.*per_user"):
        run_augment(AugmentConfig(**base, per_user=3))
    rep = run_augment(AugmentConfig(**base, per_user=3, overwrite=True))
    assert rep["status"] == "complete"
    rows = (next((tmp_path / "o").glob("*/synthetic.jsonl"))).read_text().splitlines()
    assert len(rows) == rep["kept_total"] <= 3
