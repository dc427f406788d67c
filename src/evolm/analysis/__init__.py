"""Analysis tools that read a config or a model and never reach inside it: the cost card
(parameters, KV-cache bytes, FLOPs), the memory planner (``plan.py``) and architecture comparisons."""

from evolm.analysis.cost import compare_table, cost_card, diff_configs, format_card

__all__ = ["cost_card", "format_card", "compare_table", "diff_configs"]
