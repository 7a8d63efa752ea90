"""Data: `benchmarks` (loaders, Row), `prompts` (messages, rendering), `synthetic` (CPU demo task), `download`, `stats`.

Kept empty of imports so that `import srpo_jax.data.<module>` stays cheap and needs no tokenizer.
"""
