"""The Hydra app's configs (a package, so that Hydra finds them through importlib resources)."""
