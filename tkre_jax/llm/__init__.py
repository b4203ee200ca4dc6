"""The LLM library of the generate stage (`tkre_jax/stages/generate.py`): EDKG explanations and
SCDG synthetic instances from Claude.

Modules: `prompts` (TKRE prompts, structured-output requests), `client` (the anthropic SDK client
with its retries, budget, usage and cost, live requests), `batch` (the Message Batches API),
`cache` (response cache, atomic writes), `records` (requests, and records from their answers),
`validate` (checks of every generation).
"""
