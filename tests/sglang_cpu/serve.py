"""`.venv-sglang/bin/python tests/sglang_cpu/serve.py <sglang.launch_server flags>`: the real SGLang server on the CPU.

What tests/test_sglang_real.py launches (SGLangEngine's `launch_cmd`). It puts the stub packages of ./stubs (CUDA-only
imports SGLang makes at module level; each raises if used) first on the path of this process and, through PYTHONPATH,
of the scheduler and detokenizer processes SGLang spawns; selects SGLang's CPU engine; and forbids downloads.
"""
import os
import runpy
import sys

STUBS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stubs")

os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (STUBS, os.environ.get("PYTHONPATH")) if p)
os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
sys.path[0] = STUBS  # instead of this script's directory
sys.argv = ["sglang.launch_server", *sys.argv[1:]]
runpy.run_module("sglang.launch_server", run_name="__main__", alter_sys=True)
