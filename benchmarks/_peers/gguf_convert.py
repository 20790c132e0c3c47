"""Run llama.cpp's vendored ``convert_hf_to_gguf.py`` (from the llama-cpp-python source package).

Usage: python gguf_convert.py LLAMA_CPP_DIR HF_DIR OUT.gguf OUTTYPE

Workaround, kept here only: the converter identifies a BPE pre-tokenizer by hashing how the
tokenizer splits a fixed test string and refuses any hash it does not know
("BPE pre-tokenizer was not recognized - update get_vocab_base_pre()"). The locally trained
tokenizers of ``cdcda init-model`` are byte-level BPE with the GPT-2 split regex (the
``tokenizers`` ByteLevel default, use_regex=True), which is llama.cpp's ``gpt-2`` pre-tokenizer, so
that name is forced. Upstream: ggml-org/llama.cpp convert_hf_to_gguf_update.py (the hash table
only covers published checkpoints).
"""

from __future__ import annotations

import sys
from pathlib import Path


def main() -> int:
    llama_dir, hf_dir, out, outtype = sys.argv[1:5]
    sys.path.insert(0, str(Path(llama_dir)))
    sys.path.insert(1, str(Path(llama_dir) / "gguf-py"))
    import convert_hf_to_gguf as conv
    from conversion.base import TextModel

    tok = __import__("json").loads((Path(hf_dir) / "tokenizer.json").read_text())
    pre = tok.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
    sys.argv = ["convert_hf_to_gguf.py", hf_dir, "--outfile", out, "--outtype", outtype]
    conv.main()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
