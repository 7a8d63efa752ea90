"""`python -m srpo_jax.main ARGS...` with the disk filled by "another process" (leaving 1 MB) right after checkpoint
FULL_AT_STEP's free-space check, so the write itself runs out of space (tests/test_checkpoint_disk.py).

  python -m tests.disk_full_driver FULL_AT_STEP FILLER_PATH MAIN_ARGS...
"""
import os
import shutil
import sys


def main():
  full_at, filler = int(sys.argv[1]), sys.argv[2]
  del sys.argv[1:3]
  from srpo_jax import checkpointing
  check_space = checkpointing.Checkpointer._check_space

  def check_then_fill(self, step):
    check_space(self, step)
    if step == full_at:
      with open(filler, "wb") as f:
        f.write(b"\0" * (shutil.disk_usage(self.directory).free - 1_000_000))
  checkpointing.Checkpointer._check_space = check_then_fill
  from absl import app
  from srpo_jax import config as config_lib, main as entry
  app.run(entry.main, flags_parser=config_lib.parse_flags)


if __name__ == "__main__":
  main()
