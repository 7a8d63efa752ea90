"""The embedded CPU default (`make demo`): a tiny random-init Qwen3 learning the synthetic task in minutes.

Real Qwen3 vocabulary (151,936) and the bundled tokenizer, so the whole pipeline (chat template, rewards, routing,
teacher reprompting, checkpoints) is the one the GPU configs run; only the shape is tiny (the "tiny" preset of
`srpo_jax.models.qwen3.PRESETS`: d=64, 2 layers). A model trained from scratch needs a learning rate far above the
paper's 5e-6, hence 1e-3, and a short supervised format warm-start so that some rollouts are correct at all
(otherwise every group is all-wrong and SRPO has nothing to route).
"""
from srpo_jax import config


def get_config(param: str = ""):
  del param
  c = config.get_base_config()
  c.run_dir = "runs/tiny"
  c.model.random_init = "tiny"  # dimensions: qwen3.PRESETS["tiny"] (override any with --config.model.hidden_size=...)
  c.model.dtype = "float32"  # CPU: bf16 matmuls are emulated and slower.
  c.model.param_dtype = "float32"
  c.data.task = "synthetic"
  c.data.synthetic_difficulty = 1  # the water-state family: learnable from scratch in minutes (design notes)
  c.data.max_prompt_tokens = 128
  c.rollout.engine = "jax"
  c.rollout.prompts_per_step = 16
  c.rollout.n = 8
  c.rollout.max_new_tokens = 8  # synthetic answers are a few tokens
  c.optim.lr = 1e-3  # from scratch: see the module docstring
  c.optim.warmup_steps = 5
  c.train.steps = 60
  c.train.warmstart_steps = 100
  c.train.warmstart_lr = 3e-3
  c.train.time_budgets_h = (0.05, 0.1)  # 3 and 6 minutes: the demo's analogue of the paper's 1h / 5h / 10h
  c.eval.every_steps = 10
  c.eval.n_samples = 4
  c.eval.max_questions = 64
  c.checkpoint.every_steps = 20
  c.checkpoint.keep = 2
  c.checkpoint.export_hf = False
  return c
