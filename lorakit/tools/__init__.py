"""The adapter toolbox: merge to a model folder, resize, extract, inspect."""
