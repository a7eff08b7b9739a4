"""Research: the architecture study (``python -m model.research.study``) and the causal transformer
it measures the Field Machine against. Nothing outside this folder imports it."""
