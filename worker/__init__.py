"""papermail: a self-hosted, personalised research-paper newsletter."""

__version__ = "0.1.0"
