"""SRPO routing: the paper's Tables 6 and 7, edge groups, every method, the loop reference, jit vs host."""
import jax
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from srpo_jax import methods
from srpo_jax.algorithms import routing
from tests import torch_ref_losses as ref


def _np(route):
  return {k: np.asarray(v) for k, v in route._asdict().items()}


def test_methods_table():
  assert methods.NAMES == ("grpo", "sdpo", "srpo", "srpo_no_dw", "advantage_mix", "grpo_sdpo_all")
  assert [m for m in methods.NAMES if methods.get(m).uses_teacher] == [
      "sdpo", "srpo", "srpo_no_dw", "advantage_mix", "grpo_sdpo_all"]
  assert [m for m in methods.NAMES if methods.get(m).dynamic_weighting] == ["srpo"]


def test_paper_table6_eight_rollouts_two_correct():
  """Table 6: 8 rollouts of one prompt, two correct (here the 2nd and 5th), six incorrect."""
  rewards = np.array([0, 1, 0, 0, 1, 0, 0, 0], float)
  r = _np(routing.route(rewards, np.zeros(8, int)))
  np.testing.assert_array_equal(r["sdpo_B"], rewards == 0)  # every failure has a correct sibling -> SDPO
  np.testing.assert_array_equal(r["grpo_B"], rewards == 1)  # correct ones -> GRPO (teacher available, unused)
  np.testing.assert_array_equal(r["has_teacher_B"], True)
  # The first correct sibling in group order; a correct rollout's teacher is the *other* correct one.
  np.testing.assert_array_equal(r["sibling_B"], [1, 4, 1, 1, 1, 1, 1, 1])


@pytest.mark.parametrize("rewards,expected_route", [
    ([1.0, 1.0], ["grpo", "grpo"]),        # ✓ correct, ✓ teacher: GRPO
    ([1.0, 0.0], ["grpo", "sdpo"]),        # ✓ correct, ✗ teacher (only correct one): GRPO; its failed sibling: SDPO
    ([0.0, 0.0], ["grpo", "grpo"]),        # ✗ correct, ✗ teacher: GRPO fallback
])
def test_paper_table7_decision_logic(rewards, expected_route):
  r = _np(routing.route(np.array(rewards), np.zeros(len(rewards), int)))
  got = ["sdpo" if s else "grpo" for s in r["sdpo_B"]]
  assert got == expected_route
  np.testing.assert_array_equal(r["grpo_B"], ~r["sdpo_B"])


def test_edge_groups_never_own_teacher():
  rewards = np.array([1, 1, 1, 0, 0, 0, 0.7, 0.2, 0.49], float)
  groups = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
  r = _np(routing.route(rewards, groups))
  # all-correct group: GRPO, each has the other correct ones as teacher information
  np.testing.assert_array_equal(r["sibling_B"][:3], [1, 0, 0])
  assert r["grpo_B"][:3].all()
  # all-wrong group: GRPO fallback, no teacher
  assert r["grpo_B"][3:6].all() and (r["sibling_B"][3:6] == -1).all()
  # one correct (r = 0.7 >= 0.5): it is never its own teacher -> GRPO; the failures (0.2, 0.49 < 0.5) -> SDPO
  assert r["sibling_B"][6] == -1 and r["grpo_B"][6]
  np.testing.assert_array_equal(r["sdpo_B"][7:], True)
  np.testing.assert_array_equal(r["sibling_B"][7:], 6)
  assert not (r["sibling_B"] == np.arange(9)).any()


def test_methods_masks():
  rewards = np.array([1, 0, 0, 1, 0, 0], float)
  groups = np.array([0, 0, 0, 1, 1, 1])
  rewards[3:] = [0, 0, 0]
  by = {m: _np(routing.route(rewards, groups, method=m)) for m in methods.NAMES}
  teacher = np.array([False, True, True, False, False, False])
  np.testing.assert_array_equal(by["grpo"]["grpo_B"], True)
  np.testing.assert_array_equal(by["grpo"]["sdpo_B"], False)
  # sdpo: every rollout with a correct sibling (correct ones too); the rest neither mask (zero loss).
  np.testing.assert_array_equal(by["sdpo"]["sdpo_B"], teacher)
  np.testing.assert_array_equal(by["sdpo"]["grpo_B"], False)
  np.testing.assert_array_equal(by["advantage_mix"]["grpo_B"], True)
  np.testing.assert_array_equal(by["advantage_mix"]["sdpo_B"], teacher)
  for m in ("srpo", "srpo_no_dw"):
    np.testing.assert_array_equal(by[m]["sdpo_B"], teacher)
    np.testing.assert_array_equal(by[m]["grpo_B"], ~teacher)
  # grpo_sdpo_all: the correct rollout 0 has no correct sibling here, so it takes GRPO; rollouts 1 and 2 SDPO.
  np.testing.assert_array_equal(by["grpo_sdpo_all"]["sdpo_B"], teacher)
  np.testing.assert_array_equal(by["grpo_sdpo_all"]["grpo_B"], ~teacher)
  two = np.array([1, 1, 0, 0], float)  # two correct: each has the other as teacher -> SDPO (srpo would GRPO them)
  r = _np(routing.route(two, np.zeros(4, int), method="grpo_sdpo_all"))
  np.testing.assert_array_equal(r["sdpo_B"], True)
  np.testing.assert_array_equal(r["grpo_B"], False)
  with pytest.raises(ValueError, match="method"):
    routing.route(rewards, groups, method="ppo")


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.sampled_from([0.0, 0.3, 0.5, 1.0])), min_size=1, max_size=12),
       st.sampled_from(methods.NAMES))
def test_matches_loop_reference(rows, method):
  groups = [g for g, _ in rows]
  rewards = [r for _, r in rows]
  # Pad to a fixed batch (one extra group per pad row) so the jitted route compiles once per method.
  pad = 12 - len(rows)
  groups_p = np.array(groups + list(range(100, 100 + pad)))
  rewards_p = np.array(rewards + [0.0] * pad)
  got = _np(routing.route(rewards_p, groups_p, method=method))
  grpo, sdpo, sibling = ref.route(rewards, groups, method)
  n = len(rows)
  np.testing.assert_array_equal(got["grpo_B"][:n], grpo)
  np.testing.assert_array_equal(got["sdpo_B"][:n], sdpo)
  np.testing.assert_array_equal(got["sibling_B"][:n], sibling)


def test_random_sibling_is_a_correct_other_sibling_and_works_in_jit():
  rewards = np.array([1, 1, 0, 1, 0, 0, 0, 1], float)
  groups = np.zeros(8, int)
  seen = set()
  for seed in range(6):
    r = _np(jax.jit(lambda x, g, k: routing.route(x, g, sibling_choice="random", rng=k))(
        rewards, groups, jax.random.key(seed)))
    for i, j in enumerate(r["sibling_B"]):
      assert j != i and rewards[j] >= 0.5
    seen.add(int(r["sibling_B"][2]))
  assert len(seen) > 1  # not always the first one
  with pytest.raises(ValueError, match="rng"):
    routing.route(rewards, groups, sibling_choice="random")
