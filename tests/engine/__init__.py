"""The engine's behaviour: block walk and schedules, statistics and capture, edge cases real models bring."""
