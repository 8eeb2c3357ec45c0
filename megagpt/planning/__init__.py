"""The planner: per-GPU memory and step time of a model on a layout (megagpt plan)."""
