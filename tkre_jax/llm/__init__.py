"""The generate stage: EDKG explanations and SCDG synthetic instances from Claude.

Modules: `prompts` (TKRE prompts, structured-output requests), `client` (response cache,
retries, budget, usage and cost, Message Batches), `validate` (checks of every generation),
`stage` (`run_generate`, `default_generate_config`).
"""

from __future__ import annotations

from tkre_jax.llm.stage import default_generate_config, run_generate

__all__ = ["default_generate_config", "run_generate"]
