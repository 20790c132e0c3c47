"""Helpers for benchmarks/peers.py: one module per peer toolchain plus shared measurement code.

Worker scripts (``*_worker.py``) run in a child process, often under another virtual environment
(llama.cpp, optimum-executorch), so they import only the standard library, numpy and the runtime
they measure (see ``observer.py``). They print one ``PyTorchObserver {json}`` line that the parent
parses exactly like ``cdcda bench``'s runner output.
"""
