"""Shared by the stub packages in this directory (tests/sglang_stubs, on the real SGLang server's PYTHONPATH only).

SGLang 0.5.23 imports `sgl_kernel` (CUDA-only wheels, no CPU build on the package index) and `torchvision` (PyPI's
build does not load beside the CPU torch wheel) at module level, though its CPU path (torch_native attention, no CUDA
graphs) never runs them. The stubs let those imports succeed; any use of them raises, so a code path that would
really need them fails loudly instead of computing something else.
"""
from __future__ import annotations


class StubCalled(RuntimeError):
  """A stubbed function was called: this SGLang code path needs the real package (a GPU build)."""


class Stub:
  """Stands for any attribute of a stubbed module: attributes of it are stubs too (`InterpolationMode.BICUBIC`), and
  calling it, iterating it or using it as a number raises `StubCalled`."""

  def __init__(self, name: str):
    self._name = name

  def __getattr__(self, attr: str) -> "Stub":
    if attr.startswith("__") and attr.endswith("__"):
      raise AttributeError(attr)  # copy/pickle/inspect probe dunders: absent, as on a plain object
    return Stub(f"{self._name}.{attr}")

  def __call__(self, *args, **kwargs):
    raise StubCalled(f"{self._name} is a test stub (tests/sglang_stubs): this SGLang code path needs the real "
                     "package, which has no CPU build here")

  def __iter__(self):
    self()

  def __repr__(self) -> str:
    return f"<stub {self._name}>"


def module_getattr(module_name: str):
  """A module-level `__getattr__`: `from <stub module> import anything` gives a `Stub`."""

  def __getattr__(attr: str) -> Stub:
    if attr.startswith("__") and attr.endswith("__"):
      raise AttributeError(attr)
    return Stub(f"{module_name}.{attr}")

  return __getattr__
