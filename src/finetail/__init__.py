"""finetail: fine-grained transfer by domain similarity and class-balanced long-tail losses."""

__version__ = "0.1.0"
