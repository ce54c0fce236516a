"""Tools around a model or a run: evaluate, export, bench (and op_profile), plot."""
