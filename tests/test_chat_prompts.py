"""Prompt formats (``train.format``): a base with a chat template gets its LaMP prompts as one user turn of
that template in train, eval, export (manifest), check and ``cdcda generate --chat``; a base without one, and
the random-weight ``cdcda init-model`` bases, keep the plain LaMP prompt.

What reaches the model is observed, not assumed: a forward pre-hook on every ``nn.Embedding`` records the
token ids the model embeds, and they are compared with ``tokenizer.apply_chat_template(...)``'s own output.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest

from cdcda_export.data import get_task, load_lamp, sample_paths
from cdcda_export.errors import UserError

TASK = "LaMP-3"
USERS = ["3000", "3001"]
FAST = dict(max_steps=3, batch_size=2, lr=2e-3, progress=False)
# Not the zoo's template: a system turn first, so a prompt that skipped the template could not match.
TEMPLATE = ("{{ '<|im_start|>system\nAnswer with the rating only.<|im_end|>\n' }}{% for message in messages %}"
            "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _qo() -> tuple[Path, Path]:
    q, o = sample_paths(TASK)
    return Path(q), Path(o)


def _copy_base(src: Path, dst: Path, template: str | None) -> Path:
    """A copy of a tiny base as a directory from elsewhere (no cdcda_init.json: not marked random-weight),
    with ``template`` as its tokenizer's chat template (None: no template at all)."""
    from transformers import AutoTokenizer

    shutil.copytree(src, dst)
    (dst / "cdcda_init.json").unlink()
    (dst / "chat_template.jinja").unlink(missing_ok=True)
    tok = AutoTokenizer.from_pretrained(str(dst))
    tok.chat_template = template
    tok.save_pretrained(str(dst))
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    assert bool(cfg.get("chat_template")) or (dst / "chat_template.jinja").is_file() or template is None
    if template is None:
        assert not (dst / "chat_template.jinja").is_file() and not cfg.get("chat_template")
    return dst


@pytest.fixture(scope="module")
def chat_base(tiny_base, tmp_path_factory) -> Path:
    return _copy_base(tiny_base, tmp_path_factory.mktemp("chat") / "base", TEMPLATE)


@pytest.fixture(scope="module")
def plain_base(tiny_base, tmp_path_factory) -> Path:
    return _copy_base(tiny_base, tmp_path_factory.mktemp("plain") / "base", None)


@contextmanager
def embedded_ids():
    """Every 2-D id tensor any nn.Embedding embeds while the block runs, as lists of rows."""
    import torch
    from torch.nn.modules.module import register_module_forward_pre_hook

    seen: list[list[list[int]]] = []

    def hook(module, args):
        if isinstance(module, torch.nn.Embedding) and args and args[0].dim() == 2:
            seen.append(args[0].tolist())

    handle = register_module_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def _chat_ids(tok, content: str) -> list[int]:
    return list(tok.apply_chat_template([{"role": "user", "content": content}], tokenize=True,
                                        add_generation_prompt=True)["input_ids"])


def _tok(base: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base))


def test_chat_format_matches_apply_chat_template(chat_base, plain_base, tiny_base):
    from cdcda_export.train.format import PLAIN, chat_format, encode_prompt, resolve_prompt_format

    tok = _tok(chat_base)
    fmt = resolve_prompt_format(tok, "auto", chat_base)
    assert fmt.kind == "chat" and fmt.end_of_turn_id == tok.convert_tokens_to_ids("<|im_end|>")
    ds = load_lamp(TASK, *_qo())
    for u in ds.users[:4]:
        content = ds.task.query_prompt(u.input, u.profile, k=1)
        assert encode_prompt(tok, fmt.text(content), 512) == _chat_ids(tok, content)
    # cut to fit: the turn's head (system + user header) and tail (assistant header) survive
    long = fmt.text("word " * 400 + "review: fine")
    cut = encode_prompt(tok, long, 48)
    full = _chat_ids(tok, "word " * 400 + "review: fine")
    head = _chat_ids(tok, "x")[:len(tok(fmt.user_prefix, add_special_tokens=False)["input_ids"])]
    assert len(cut) == 48 and cut[:len(head)] == head and cut[-6:] == full[-6:]
    # no template: auto is plain, chat is refused naming the tokenizer config
    ptok = _tok(plain_base)
    assert chat_format(ptok) is None and resolve_prompt_format(ptok, "auto", plain_base) == PLAIN
    with pytest.raises(UserError, match="no usable chat template") as e:
        resolve_prompt_format(ptok, "chat", plain_base)
    assert "tokenizer_config.json" in str(e.value)
    # the random-weight zoo bases (the test fixtures) carry a template but stay plain under auto
    assert chat_format(_tok(tiny_base)) is not None
    assert resolve_prompt_format(_tok(tiny_base), "auto", tiny_base) == PLAIN


@pytest.fixture(scope="module")
def chat_adapters(chat_base, tmp_path_factory):
    from cdcda_export.train import train_users

    out = tmp_path_factory.mktemp("chat-adapters")
    with embedded_ids() as seen:
        res = train_users(chat_base, TASK, *_qo(), out, users=USERS[:1], seed=0, **FAST)
    assert [r.status for r in res] == ["trained"]
    return out, seen


def test_train_feeds_chat_turns_and_records_the_format(chat_base, chat_adapters):
    from cdcda_export.train import train as T
    from cdcda_export.train.format import PLAIN, resolve_prompt_format

    out, seen = chat_adapters
    meta = json.loads((out / USERS[0] / "training.json").read_text())
    assert meta["hyperparameters"]["prompt_format"] == "chat"
    assert T.hyper_from_training(out / USERS[0]).prompt_format == "chat"

    tok = _tok(chat_base)
    fmt = resolve_prompt_format(tok, "chat", chat_base)
    ds = load_lamp(TASK, *_qo())
    hp = T.hyper_from_training(out / USERS[0])
    plain = T.user_data(ds, ds.user(USERS[0]), hp, fmt=PLAIN)
    chat = T.user_data(ds, ds.user(USERS[0]), hp, fmt=fmt)
    # the same LaMP prompts, each inside one user turn
    contents = [p[:-len("\nAnswer: ")] for p, _, _ in plain.train]
    assert [p for p, _, _ in chat.train] == [fmt.text(c) for c in contents]
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    expected_train = {tuple(_chat_ids(tok, c) + tok(a, add_special_tokens=False)["input_ids"] + [eot])
                      for c, (_, a, _) in zip(contents, plain.train)}
    pad = tok.pad_token_id

    def trim(r: list[int]) -> tuple[int, ...]:
        while r and r[-1] == pad:
            r = r[:-1]
        return tuple(r)

    trained_rows = {trim(r) for rows in seen for r in rows if len(trim(r)) > 1 and trim(r)[-1] == eot}
    assert trained_rows and trained_rows <= expected_train, "a training row is not chat turn + answer + end of turn"
    # held-out pairs and the LaMP query are answered from the chat turn (before and after training)
    prefills = {tuple(rows[0]) for rows in seen if len(rows) == 1 and len(rows[0]) > 1 and rows[0][-1] != eot}
    held = {tuple(_chat_ids(tok, p[:-len("\nAnswer: ")])) for p, _ in plain.heldout}
    query = tuple(_chat_ids(tok, plain.query[0][:-len("\nAnswer: ")]))
    assert held | {query} <= prefills


def test_eval_uses_chat_for_the_base_and_the_recorded_format_for_adapters(chat_base, chat_adapters):
    from cdcda_export.train import evaluate

    out, _ = chat_adapters
    tok = _tok(chat_base)
    ds = load_lamp(TASK, *_qo())
    spec = get_task(TASK)
    with embedded_ids() as seen:
        rep = evaluate(chat_base, TASK, *_qo(), adapter_root=out, users=USERS, progress=False)
    assert {u: r["prompt_format"] for u, r in rep["per_user"].items()} == {"3000": "chat", "3001": "chat"}
    assert rep["per_user"]["3000"]["adapter"] and rep["per_user"]["3001"]["adapter"] is None
    prefills = [rows[0] for rows in seen if len(rows[0]) > 1]
    assert prefills == [_chat_ids(tok, spec.query_prompt(ds.user(u).input, ds.user(u).profile, k=1)) for u in USERS]

    # plain for the base on request; the chat-trained adapter refuses a contradicting format
    with embedded_ids() as seen:
        rep = evaluate(chat_base, TASK, *_qo(), users=USERS[1:], prompt_format="plain", progress=False)
    u = ds.user(USERS[1])
    plain_text = spec.query_prompt(u.input, u.profile, k=1).rstrip() + "\nAnswer: "
    assert [rows[0] for rows in seen if len(rows[0]) > 1] == [tok(plain_text)["input_ids"]]
    with pytest.raises(UserError, match="trained on chat prompts"):
        evaluate(chat_base, TASK, *_qo(), adapter_root=out, users=USERS[:1], prompt_format="plain", progress=False)


def test_template_less_base_keeps_plain_prompts(plain_base, tmp_path):
    from cdcda_export.train import evaluate, train_users

    tok = _tok(plain_base)
    with embedded_ids() as seen:
        train_users(plain_base, TASK, *_qo(), tmp_path / "ad", users=USERS[:1], **FAST)
    assert json.loads((tmp_path / "ad" / USERS[0] / "training.json").read_text())["hyperparameters"][
        "prompt_format"] == "plain"
    assert not any(tok.convert_tokens_to_ids("<|im_start|>") in r for rows in seen for r in rows)
    ds = load_lamp(TASK, *_qo())
    u = ds.user(USERS[1])
    with embedded_ids() as seen:
        rep = evaluate(plain_base, TASK, *_qo(), users=[u.id], progress=False)
    assert rep["per_user"][u.id]["prompt_format"] == "plain"
    text = get_task(TASK).query_prompt(u.input, u.profile, k=1).rstrip() + "\nAnswer: "
    assert [rows[0] for rows in seen if len(rows[0]) > 1] == [tok(text)["input_ids"]]


def test_export_check_and_generate_chat_use_the_template(chat_base, tmp_path):
    """The manifest tells an app how to format a prompt; check's user prompts and `cdcda generate --chat`
    follow it, and ORT GenAI renders the artifact's own template identically."""
    import onnxruntime_genai as og
    import torch
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from cdcda_export.check.prompts import user_prompts
    from cdcda_export.cli import app
    from cdcda_export.export.api import export
    from cdcda_export.train.format import encode_prompt

    tok = _tok(chat_base)
    art = export(chat_base, None, "onnx/fp32", tmp_path / "art", progress=False)
    man = json.loads((art / "manifest.json").read_text())
    pf = man["io"]["prompt_format"]
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    assert pf["format"] == "chat" and pf["add_special_tokens"] is False and pf["end_of_turn_token_id"] == eot
    assert pf["user_prefix"] + "hello" + pf["user_suffix"] == tok.apply_chat_template(
        [{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True)
    assert eot in man["io"]["eos_token_ids"]

    ds = load_lamp(TASK, *_qo())
    prompts, _ = user_prompts(man, TASK, *_qo(), None, art)
    spec = get_task(TASK)
    assert [encode_prompt(tok, p.text, 512) for p in prompts] == [
        _chat_ids(tok, spec.query_prompt(u.input, u.profile, k=1)) for u in ds.users]

    question = "Rate this review: the soup was cold."
    ids = _chat_ids(tok, question)
    res = CliRunner().invoke(app, ["generate", str(art), "--prompt", question, "--chat", "--max-new-tokens", "6"])
    assert res.exit_code == 0, res.output
    assert f"[{len(ids)} prompt tokens" in res.output
    model = AutoModelForCausalLM.from_pretrained(str(chat_base), dtype=torch.float32)
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=[eot])[0, len(ids):]
    answer = tok.decode(ref.tolist(), skip_special_tokens=True)
    assert res.output.startswith(f"{answer}\n[{len(ids)} prompt tokens, {len(ref)} new"), res.output

    ort_tok = og.Tokenizer(og.Model(str(art)))
    assert ort_tok.apply_chat_template(json.dumps([{"role": "user", "content": question}]),
                                       add_generation_prompt=True) == tok.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)


def test_generate_chat_on_plain_artifacts(tiny_artifact, plain_base, tmp_path):
    """A random-weight zoo base exports with plain prompts (its fidelity baselines are unchanged); --chat
    still uses the template its tokenizer ships, and says the artifact records plain prompts. An artifact
    whose tokenizer has no template refuses --chat, naming the file."""
    from typer.testing import CliRunner

    from cdcda_export.cli import app
    from cdcda_export.export.api import export

    art = tiny_artifact("tiny", "onnx/fp32")
    assert json.loads((art / "manifest.json").read_text())["io"]["prompt_format"] == {
        "format": "plain", "user_prefix": "", "user_suffix": "\nAnswer: ", "add_special_tokens": True}
    res = CliRunner().invoke(app, ["generate", str(art), "--prompt", "hi", "--chat", "--max-new-tokens", "2"])
    assert res.exit_code == 0, res.output
    assert "records plain prompts" in res.output

    bare = export(plain_base, None, "onnx/fp32", tmp_path / "bare", progress=False)
    res = CliRunner().invoke(app, ["generate", str(bare), "--prompt", "hi", "--chat"])
    msg = res.output + str(res.exception)
    assert res.exit_code != 0 and isinstance(res.exception, UserError), msg
    assert "no chat template" in msg and str(bare / "tokenizer_config.json") in msg


def test_adapter_artifact_checks_on_the_chat_turns_it_was_trained_on(chat_base, chat_adapters, tmp_path):
    """export takes the format from the adapter's training.json; check rebuilds the user's held-out pairs
    and query in it. An adapter whose training.json predates the record counts as plain."""
    from cdcda_export.check.prompts import user_prompts
    from cdcda_export.export.api import artifact_prompt_format, export
    from cdcda_export.train import train as T
    from cdcda_export.train.format import PLAIN, encode_prompt

    out, _ = chat_adapters
    adapter = out / USERS[0]
    art = export(chat_base, adapter, "onnx/fp32", tmp_path / "art", progress=False)
    man = json.loads((art / "manifest.json").read_text())
    assert man["io"]["prompt_format"]["format"] == "chat" and man["user_id"] == USERS[0]
    tok = _tok(chat_base)
    prompts, _ = user_prompts(man, TASK, *_qo(), adapter, art)
    ds = load_lamp(TASK, *_qo())
    plain = T.user_data(ds, ds.user(USERS[0]), T.hyper_from_training(adapter), fmt=PLAIN)
    expected = [_chat_ids(tok, p[:-len("\nAnswer: ")]) for p, _ in plain.heldout] + [
        _chat_ids(tok, plain.query[0][:-len("\nAnswer: ")])]
    assert [p.kind for p in prompts][-1] == "user-query" and len(prompts) == len(expected) > 1
    assert [encode_prompt(tok, p.text, 512) for p in prompts] == expected

    old = tmp_path / "old-adapter"
    shutil.copytree(adapter, old)
    meta = json.loads((old / "training.json").read_text())
    del meta["hyperparameters"]["prompt_format"]
    (old / "training.json").write_text(json.dumps(meta))
    assert artifact_prompt_format(chat_base, old) == PLAIN.describe()
