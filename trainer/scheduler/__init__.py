"""The scheduler: plan, cost model, simulator, profiler, hardware descriptions, planner."""
