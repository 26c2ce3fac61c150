"""grove-engine: declarative, GitOps-style engine for teams of isolated AI coding agents."""

__version__ = "0.1.0"
