"""Analysis: pure functions over routing records (FLOPs, telemetry maths), depth pictures, efficiency."""
