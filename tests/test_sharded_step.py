"""The update on 8 forced CPU devices: its compiled batch input is split over ("data", "fsdp"), and the step on meshes
(data, fsdp, tensor) = (8,1,1), (1,8,1), (2,2,2) equals the 1-device step (loss and updated parameters),
on sharpened models where that comparison can see the DW weights and the SDPO term (the negative cases)."""
import json
import os
import subprocess
import sys

from tests.e2e_utils import REPO


def test_sharded_update_equals_single_device():
  env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
  proc = subprocess.run([sys.executable, "-m", "tests.sharded_step_worker"], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
  res = json.loads(line[len("RESULT "):])
  ref = res.pop("ref_loss")
  # Material: DW weights spread over > 10%, and a broken DW normaliser or a dropped SDPO term (> 1% of the loss)
  # moves the loss and the update far past the tolerances below: the comparison would fail.
  assert res.pop("dw_spread") > 1.1
  broken = res.pop("broken")
  for case, r in broken.items():
    assert abs(r["loss"] - ref) > 100 * 1e-5 * abs(ref) and r["rel_update_diff"] > 100 * 1e-5, (case, r)
  dropped = broken["sdpo_term_dropped"]["loss"]
  assert abs(ref - dropped) / (abs(dropped) + abs(ref - dropped)) > 0.01
  assert set(res) == {"(8, 1, 1)", "(1, 8, 1)", "(2, 2, 2)"}
  for mesh, r in res.items():
    assert abs(r["loss"] - ref) <= 1e-5 * abs(ref), (mesh, r["loss"], ref)
    # The parameter update (SGD, lr 1: the gradient) in the 2-norm over all parameters, as test_train_step's bound.
    assert r["rel_update_diff"] <= 1e-5, (mesh, r)
    assert "('data', 'fsdp')" in r["batch_ids_spec"], (mesh, r["batch_ids_spec"])
  # FSDP: weights are gathered and gradients reduced across the fsdp axis, not computed on replicated batches.
  assert "all-gather" in res["(1, 8, 1)"]["collectives"]
