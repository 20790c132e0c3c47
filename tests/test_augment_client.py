"""Unit tests: Retry-After parsing, API-key resolution, the response cache key."""

from __future__ import annotations

import email.utils
import time

import pytest

from cdcda_export.augment.augmenter import resolve_api_key
from cdcda_export.augment.cache import ResponseCache, cache_key
from cdcda_export.augment.client import parse_retry_after
from cdcda_export.errors import UserError


def test_parse_retry_after_seconds_date_and_cap():
    assert parse_retry_after("3", cap=60) == 3.0
    assert parse_retry_after("0.5", cap=60) == 0.5
    assert parse_retry_after("600", cap=60) == 60.0
    when = email.utils.formatdate(time.time() + 10, usegmt=True)
    assert 8.0 <= parse_retry_after(when, cap=60) <= 10.0      # HTTP-date, 2 s tolerance for the clock
    assert parse_retry_after(email.utils.formatdate(time.time() - 100, usegmt=True), cap=60) == 0.0
    assert parse_retry_after("soon", cap=60) is None and parse_retry_after(None, cap=60) is None


def test_api_key_comes_from_the_environment_only(monkeypatch):
    monkeypatch.setenv("MY_TEACHER_KEY", "sk-abc")
    assert resolve_api_key("MY_TEACHER_KEY", explicit=True) == "sk-abc"
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert resolve_api_key("OPENAI_API_KEY", explicit=False) is None   # local servers need no key
    with pytest.raises(UserError, match="NOPE_KEY is not set"):
        resolve_api_key("NOPE_KEY", explicit=True)


def test_cache_key_covers_template_model_params_inputs(tmp_path):
    base = dict(template="LaMP-3@v1+base@v1", template_sha256="a" * 64, model="m", params={"temperature": 0.8},
                messages=[{"role": "user", "content": "x"}], attempt=0, seed=1)
    k = cache_key(**base)
    for field, value in [("template", "LaMP-3@v2+base@v1"), ("model", "m2"), ("params", {"temperature": 0.7}),
                         ("messages", [{"role": "user", "content": "y"}]), ("attempt", 1)]:
        assert cache_key(**{**base, field: value}) != k, field
    assert cache_key(**dict(reversed(list(base.items())))) == k   # order-independent
    c = ResponseCache(tmp_path / "cache")
    assert c.get(k) is None
    c.put(k, {"content": "hi"})
    assert c.get(k) == {"content": "hi"} and len(c) == 1
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_reports_never_carry_url_secrets():
    from cdcda_export.augment.augmenter import safe_url

    assert safe_url("https://user:pw@api.example.com:8443/v1?api-key=abc") == "https://api.example.com:8443/v1"
    assert safe_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1" and safe_url(None) is None
