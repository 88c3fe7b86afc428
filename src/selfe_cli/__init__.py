"""selfe: few-step and any-step generative image models (flow matching, MeanFlow, Self-E)."""

__version__ = "0.1.0"
