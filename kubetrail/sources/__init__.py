"""Sources (Fluent Bit's inputs): one module per plugin, each an async ``run`` loop."""
