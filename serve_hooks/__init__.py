"""greylens.serve_hooks: the split-inference engine and the hook that computes SAE features and
probe scores inside it. Not built yet: see the open issues."""
