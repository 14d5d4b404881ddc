"""vdeploy: a vLLM deployment as a pure function of a manifest and its lockfile."""

__version__ = "0.1.0"
