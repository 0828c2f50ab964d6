"""Files: allowlisted component specs, the architecture object, checkpoint loading, exports, old paths."""
