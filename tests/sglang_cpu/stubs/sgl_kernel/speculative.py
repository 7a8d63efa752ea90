"""Stub (tests/sglang_stubs/_sglang_stub.py): importable, raises when used."""
from _sglang_stub import module_getattr

__getattr__ = module_getattr(__name__)
